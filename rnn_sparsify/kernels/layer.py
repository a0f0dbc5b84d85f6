"""The layer-level backend contract: one LSTM layer, one direction, the whole sequence.

A *layer backend* owns the time loop of one layer/direction, forward and backward, the way
cuDNN's ``cudnnRNNForward`` and oneDNN's ``lstm_forward`` do: the loop over time lives inside
the backend, where it can be fused (CPU) or made persistent (GPU). The autograd Function
(:class:`rnn_sparsify.lstm_function.LSTMLayerFunction`) only calls::

    y, h_T, c_T, saved, meta = backend.forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = backend.backward(saved, meta, plan,
                                                                       dy, dh_T, dc_T, needs)

``x`` is the padded sequence (T, B, I) in processing-independent time order (a reverse
direction is ``plan.reverse``), ``plan`` is the :class:`~rnn_sparsify.lstm_function.LayerPlan`
(kept units per step, scales, gate-sparsity config, packed batch sizes), ``saved`` the
tensors to keep for backward (they go through ``ctx.save_for_backward``), ``meta`` anything
else. Weights are in ``nn.LSTM`` layout; how a backend stores them internally is its own
business (the TVM CPU backend keeps a transposed, gate-interleaved copy).

Choosing a backend is a rule list (as TVM's dlight does for schedules): each rule looks at a
:class:`LayerProblem` and returns a backend, or a string saying why it does not apply. The
first backend wins; the per-step composition of GEMMs on the selected GEMM backend
(:class:`ComposedLayerBackend`, the float64 oracle on the reference GEMMs) always applies and
comes last. :func:`select_layer_backend` returns the winner and every rule's verdict, which
``SparseLSTM.last_backend_reasons`` and the ``sparsify`` report show.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

__all__ = [
    "LayerProblem",
    "LayerBackend",
    "ComposedLayerBackend",
    "register_layer_rule",
    "unregister_layer_rule",
    "select_layer_backend",
    "as_layer_backend",
]


def coarse_params(gs) -> tuple:
    """``(P, R, S)`` of a coarse ``GateGradientSparsity``, else ``()``."""
    return (gs.P, gs.R, gs.S) if gs is not None and gs.mode == "coarse" else ()


@dataclass(frozen=True)
class LayerProblem:
    """What a rule needs to decide whether its backend takes one layer/direction call."""

    device: torch.device
    dtype: torch.dtype
    input_size: int
    hidden_size: int
    proj_size: int = 0
    batch: int = 1
    seq_len: int = 1
    packed: bool = False
    reverse: bool = False
    in_keep: Optional[int] = None  # kept input units per step; None = no input dropout
    rec_keep: Optional[int] = None  # kept units of h_{t-1} per step; None = no RH dropout
    gate_mode: Optional[str] = None  # "coarse" / "fine" / "meprop" or None
    gate_coarse: tuple = ()  # (P, R, S) when gate_mode is "coarse"
    func_transform: bool = False  # inside a torch.func transform (grad, vmap, ...)

    @property
    def device_type(self) -> str:
        return self.device.type


class LayerBackend:
    """Base class of layer backends (see the module docstring for the contract)."""

    name = "layer"

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan):  # pragma: no cover
        raise NotImplementedError

    def backward(self, saved, meta, plan, dy, dhn, dcn, needs):  # pragma: no cover
        raise NotImplementedError


class ComposedLayerBackend(LayerBackend):
    """The per-step composition of indexed GEMMs on a GEMM backend (``fwd_input``,
    ``fwd_recurrent``, ``bwd_data``, ``wgrad``, ... of
    :class:`~rnn_sparsify.kernels.reference.ReferenceBackend`).

    On the reference GEMMs this is the oracle every faster backend is tested against (it runs
    in float64, for any shape, packed or not, with projections). On the generated CUDA GEMMs
    (:class:`~rnn_sparsify.kernels.cuda_backend.CudaKernelBackend`) it is the per-step GPU path.
    """

    def __init__(self, gemm):
        self.gemm = gemm
        self.name = gemm.name

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan):
        from ..lstm_function import composed_forward

        return composed_forward(self.gemm, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan)

    def backward(self, saved, meta, plan, dy, dhn, dcn, needs):
        from ..lstm_function import composed_backward

        return composed_backward(self.gemm, saved, meta, plan, dy, dhn, dcn, needs)

    def __repr__(self) -> str:
        return f"ComposedLayerBackend({self.gemm.name})"


_COMPOSED: dict[int, ComposedLayerBackend] = {}


def as_layer_backend(backend) -> LayerBackend:
    """A layer backend for ``backend``: itself, or the per-step composition of a GEMM backend."""
    if isinstance(backend, LayerBackend):
        return backend
    key = id(backend)
    comp = _COMPOSED.get(key)
    if comp is None or comp.gemm is not backend:
        comp = _COMPOSED[key] = ComposedLayerBackend(backend)
    return comp


class _Named(LayerBackend):
    """Stands for a backend a dry rule would pick (reports only; never run)."""

    def __init__(self, name: str):
        self.name = name


def explain_lstm(module, batch: int = 1, seq_len: int = 35, configs: Optional[tuple] = None
                 ) -> tuple[str, list[tuple[str, str]]]:
    """``(backend name, verdicts)`` for the first layer of an LSTM / LSTMCell module in training
    (dry: nothing is built), with the module's own configs or ``configs`` =
    ``(structured_dropout, gate_sparsity)``. A module with nothing sparse runs ``nn.LSTM``."""
    from ..config import kept_count

    w = next(iter(module.parameters()), None)
    if w is None:
        return "nn.LSTM", [("dense", "no parameters")]
    if configs is None:
        configs = (getattr(module, "structured_dropout", None), getattr(module, "gate_sparsity", None))
    sd, gs = configs
    if not ((sd is not None and sd.active) or gs is not None):
        return "nn.LSTM", [("dense", "nothing sparse in training: nn.LSTM's own kernels (oneDNN/cuDNN)")]
    I, H = module.input_size, module.hidden_size
    prob = LayerProblem(
        device=w.device, dtype=w.dtype, input_size=I, hidden_size=H,
        proj_size=getattr(module, "proj_size", 0), batch=batch, seq_len=seq_len,
        in_keep=kept_count(I, sd.p_input) if sd is not None and sd.p_input > 0 else None,
        rec_keep=kept_count(H, sd.p_recurrent) if sd is not None and sd.p_recurrent > 0 else None,
        gate_mode=gs.mode if gs is not None else None,
        gate_coarse=coarse_params(gs),
    )
    be, verdicts = select_layer_backend(prob, dry=True)
    return be.name, verdicts


Rule = Callable[[LayerProblem], Union[LayerBackend, str, None]]
_LAYER_RULES: list[tuple[str, Rule]] = []


def register_layer_rule(name: str, rule: Rule, *, first: bool = True) -> None:
    """Register a layer-backend rule: ``rule(problem)`` returns a backend, or a string (or
    ``None``) when it does not apply. Re-registering a name replaces it."""
    global _LAYER_RULES
    _LAYER_RULES = [r for r in _LAYER_RULES if r[0] != name]
    if first:
        _LAYER_RULES.insert(0, (name, rule))
    else:
        _LAYER_RULES.append((name, rule))


def unregister_layer_rule(name: str) -> None:
    global _LAYER_RULES
    _LAYER_RULES = [r for r in _LAYER_RULES if r[0] != name]


def select_layer_backend(problem: LayerProblem, *, dry: bool = False) -> tuple[LayerBackend, list[tuple[str, str]]]:
    """The first applicable layer backend and every rule's verdict ``(rule, "used" | why not)``.

    The composition of GEMMs on the selected GEMM backend always applies and comes last.
    ``dry=True`` (reports, ``rnn-sparsify env``) asks rules that have a ``dry`` variant to
    answer without building or loading kernels.
    """
    from . import select_backend

    verdicts: list[tuple[str, str]] = []
    for name, rule in list(_LAYER_RULES):
        try:
            fn = (getattr(rule, "dry", None) or rule) if dry else rule
            res = fn(problem)
        except Exception as e:  # a broken rule must never break training: fall through
            res = f"rule failed: {type(e).__name__}: {e}"
        if isinstance(res, LayerBackend):
            verdicts.append((name, "used"))
            return res, verdicts
        if dry and isinstance(res, tuple):  # (backend name, note) from a dry rule
            verdicts.append((name, "used: " + res[1]))
            return _Named(res[0]), verdicts
        verdicts.append((name, res or "does not apply"))
    gemm = select_backend(problem.device, problem.dtype)
    backend = as_layer_backend(gemm)
    verdicts.append((f"per-step GEMMs ({gemm.name})", "used"))
    return backend, verdicts
