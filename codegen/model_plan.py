"""Which kernels a model needs: every LSTM, LSTMCell and hand-written cell, built or not and why.

``plan_model(model, batch, seq_len, ...)`` is what ``rnn-sparsify compile --model`` builds from:

* with configs (``structured_dropout``/``gate_sparsity``, from the command line), the model
  is first passed through :func:`rnn_sparsify.sparsify` with them, so the plan follows exactly
  what ``sparsify`` would do (an LSTM it skips is listed with its reason);
* without, the configs already on the model are used (a model returned by ``sparsify``, or a
  ``torch.save``'d one): ``SparseLSTM``/``SparseLSTMCell`` modules and rewritten hand-written
  cells (``SparseCellRegion``).

Per entry: ``SparseLSTM`` -> one :class:`~.lstm_spec.LSTMSpec` over ``seq_len`` steps;
``SparseLSTMCell`` and a hand-written cell without normalisation -> one step (``seq_len=1``,
the cell runs once per call); a cell with normalisation runs its own graph (no kernels); a
dense ``nn.LSTM``/``nn.LSTMCell`` stays on cuDNN/cuBLAS. Pure torch: no TVM needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .lstm_spec import LSTMSpec

__all__ = ["PlanEntry", "ModelPlan", "plan_model", "dtype_note"]


@dataclass
class PlanEntry:
    name: str  # module path in the model ("<root>" for the model itself)
    kind: str
    built: bool
    reason: str
    kernels: int = 0


@dataclass
class ModelPlan:
    lstms: list[LSTMSpec] = field(default_factory=list)
    entries: list[PlanEntry] = field(default_factory=list)
    sparsified_from_flags: bool = False
    param_dtypes: list[str] = field(default_factory=list)  # parameter dtypes of the built LSTMs

    def table(self) -> str:
        rows = [(e.name, e.kind, f"{e.kernels} kernels" if e.built else "not built", e.reason) for e in self.entries]
        w = [max([len(r[k]) for r in rows] + [4]) for k in range(3)]
        return "\n".join("  ".join(r[k].ljust(w[k]) for k in range(3)) + "  " + r[3] for r in rows)


def _dtype(module, dtype: Optional[str]) -> str:
    if dtype is not None:
        return dtype
    w = next(iter(module.parameters()), None)
    dt = str(w.dtype).replace("torch.", "") if w is not None else "float32"
    if dt not in ("bfloat16", "float16", "float32"):
        from .errors import UnsupportedGemm

        raise UnsupportedGemm(f"the model's parameters are {dt}; the kernels are bfloat16, float16 or float32: "
                              "pass --dtype (dtype= in Python)")
    return dt


def _cfg_text(sd, gs) -> str:
    parts = []
    if sd is not None:
        parts.append(f"structured dropout p_input={sd.p_input} p_recurrent={sd.p_recurrent}")
    if gs is not None:
        parts.append(f"gate sparsity {gs.mode}")
    return ", ".join(parts)


def _sparse_spec(name, module, input_size, hidden_size, batch, seq_len, dtype, sd, gs, **kw):
    """(spec, reason) or (None, why nothing is sparse)."""
    if (sd is None or not sd.active) and gs is None:
        return None, ("its configs make every GEMM dense (no structured dropout with p > 0, no gate-gradient "
                      "sparsity): it runs on cuBLAS; sparsify it with --p-input/--p-recurrent/--gate")
    spec = LSTMSpec(input_size=input_size, hidden_size=hidden_size, batch=batch, seq_len=seq_len,
                    dtype=_dtype(module, dtype), structured_dropout=sd.to_dict() if sd is not None else None,
                    gate_sparsity=gs.to_dict() if gs is not None else None, name=name, **kw)
    if not spec.gemms():
        return None, "its configs leave no GEMM sparse at these sizes"
    return spec, _cfg_text(sd, gs)


def plan_model(model, batch: int, seq_len: int, dtype: Optional[str] = None, *, structured_dropout=None,
               gate_sparsity=None) -> ModelPlan:
    """The kernels ``model`` needs for ``batch`` x ``seq_len`` (see the module docstring).

    Raises :class:`rnn_sparsify.sparsify.NoLSTMFoundError` when the model holds nothing LSTM-like.
    """
    from torch import nn

    from rnn_sparsify.modules import SparseLSTM, SparseLSTMCell
    from rnn_sparsify.passes.find_lstm import display_fqn
    from rnn_sparsify.passes.rewrite import SparseCellRegion
    from rnn_sparsify.sparsify import SKIPPED, get_report, inspect_model, sparsify

    configs = [c for c in (structured_dropout, gate_sparsity) if c is not None]
    plan = ModelPlan(sparsified_from_flags=bool(configs))
    skipped: dict[str, str] = {}
    if configs:
        model = sparsify(model, *configs)
        report = get_report(model)
        for e in report.lstms:
            if e.handling == SKIPPED:
                skipped[e.fqn] = e.reason
        for e in report.lstms:  # candidates, TorchScript modules: no LSTM module to build
            if e.handling == SKIPPED and not isinstance(_get(model, e.fqn), (nn.LSTM, nn.LSTMCell)):
                plan.entries.append(PlanEntry(display_fqn(e.fqn) + (f"[{e.node}]" if e.node else ""), e.kind,
                                              False, e.reason))
    seen: set[int] = set()
    for fqn, m in model.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        name = display_fqn(fqn)
        if isinstance(m, SparseLSTM):
            sd, gs = m.structured_dropout, m.gate_sparsity
            spec, why = _sparse_spec(name, m, m.input_size, m.hidden_size, batch, seq_len, dtype, sd, gs,
                                     num_layers=m.num_layers, bidirectional=m.bidirectional)
            if spec is not None and m.proj_size:
                spec, why = None, f"proj_size={m.proj_size}: the kernels do not cover projected LSTMs yet (reference path)"
            _add(plan, name, "SparseLSTM", spec, why, module=m)
        elif isinstance(m, SparseLSTMCell):
            spec, why = _sparse_spec(name, m, m.input_size, m.hidden_size, batch, 1, dtype,
                                     m.structured_dropout, m.gate_sparsity)
            _add(plan, name, "SparseLSTMCell", spec, why, per_step=True, module=m)
        elif isinstance(m, SparseCellRegion):
            name = display_fqn(fqn.rpartition(".")[0])  # the user's module that holds the cell
            if m.canonical is None:
                plan.entries.append(PlanEntry(name, "hand-written cell", False,
                                              "normalisation inside the cell: it runs its own graph, no GEMM kernels"))
                continue
            spec, why = _sparse_spec(name, m, m.input_size, m.hidden_size, batch, 1, dtype,
                                     m.structured_dropout, m.gate_sparsity)
            _add(plan, name, "hand-written cell", spec, why, per_step=True, module=m)
        elif isinstance(m, (nn.LSTM, nn.LSTMCell)):
            kind = "nn.LSTM" if isinstance(m, nn.LSTM) else "nn.LSTMCell"
            why = skipped.get(fqn) or ("dense (no sparsity config on it): runs on cuDNN/cuBLAS; pass "
                                       "--p-input/--p-recurrent/--gate, or compile a model returned by sparsify(...)")
            plan.entries.append(PlanEntry(name, kind, False, why))
    if not configs:
        # hand-written cells of a dense model are only visible to the graph passes
        from rnn_sparsify.sparsify import NoLSTMFoundError

        try:
            report = inspect_model(model)
        except NoLSTMFoundError:
            report = None
        if report is not None:
            for e in report.lstms:
                mod = _get(model, e.fqn)
                if isinstance(mod, (nn.LSTM, nn.LSTMCell, SparseCellRegion)):
                    continue  # listed by the module walk
                if e.kind.startswith("hand-written") and e.handling != SKIPPED:
                    why = "dense hand-written cell: pass --p-input/--p-recurrent/--gate to build kernels for it"
                else:
                    why = e.reason
                plan.entries.append(PlanEntry(display_fqn(e.fqn) + (f"[{e.node}]" if e.node else ""), e.kind,
                                              False, why))
    if not plan.entries:
        from rnn_sparsify.sparsify import NoLSTMFoundError

        raise NoLSTMFoundError("no nn.LSTM, nn.LSTMCell or hand-written LSTM cell found in the model")
    return plan


def _get(model, fqn: str):
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


def _add(plan: ModelPlan, name: str, kind: str, spec: Optional[LSTMSpec], why: str, per_step: bool = False,
         module=None) -> None:
    if spec is None:
        plan.entries.append(PlanEntry(name, kind, False, why))
        return
    plan.lstms.append(spec)
    w = next(iter(module.parameters()), None) if module is not None else None
    if w is not None and str(w.dtype).replace("torch.", "") not in plan.param_dtypes:
        plan.param_dtypes.append(str(w.dtype).replace("torch.", ""))
    step = " (one step per call)" if per_step else ""
    plan.entries.append(PlanEntry(name, kind, True, why + step, kernels=len(spec.gemms())))


_TENSOR_CORE = {"bfloat16": True, "float16": True, "float32": False}


def dtype_note(built: list[str], requested: Optional[str], param_dtypes: list[str] = ()) -> str:
    """One line for ``compile``: the dtype(s) of the GEMM kernels built, whether they run on
    tensor cores, and -- where the model's parameters are float32 -- what ``torch.autocast``
    training will run.

    ``built``: the GEMM kernels' dtypes; ``requested``: ``--dtype`` (None: the model's own);
    ``param_dtypes``: the parameter dtypes of the model's built LSTMs (empty for an LSTM spec).

    What the run time does (``rnn_sparsify.kernels``; read from the code, not run on a GPU):
    the GEMM backend is chosen per layer call by the dtype of the layer input
    (``select_backend(device, x.dtype)``), and ``CudaKernelBackend`` takes a kernel only when
    every operand has one dtype the bundle holds. CUDA autocast casts neither the weights nor
    the input of the sparse LSTM (only the CPU path casts, to the parameters' dtype), so a
    float32 model under autocast runs float32 kernels for a float32 input and the reference
    path for an autocast-produced bfloat16/float16 input (float32 weights: mixed dtypes).
    """
    parts = []
    for dt in sorted(set(built)):
        how = "tensor cores (mma.sync m16n8k16, fp32 accumulation)" if _TENSOR_CORE.get(dt) else \
            "SIMT FMA, no tensor cores"
        parts.append(f"{dt} ({how})")
    if not parts:
        return ""
    line = "built " + " and ".join(parts) + " GEMM kernels"
    if requested is None and param_dtypes:
        line += f", the model's parameter dtype ({', '.join(param_dtypes)})"
    elif requested is None:
        line += " (the default for an LSTM spec)"
    float32_model = "float32" in param_dtypes
    if float32_model and requested is None:
        line += ("; under torch.autocast the weights stay float32 and the backend picks kernels by the LSTM "
                 "input's dtype: a float32 input (e.g. from an embedding) runs these float32 kernels, an autocast "
                 "one (bfloat16/float16) the reference torch path; bfloat16 tensor-core kernels (--dtype bfloat16) "
                 "run only for a model converted with model.to(torch.bfloat16)")
    elif float32_model and any(_TENSOR_CORE.get(dt) for dt in built):
        line += (f"; the model's parameters are float32: these kernels run only after model.to(torch.{requested}) "
                 "(inputs too); under torch.autocast the weights stay float32, so no kernel here matches and the "
                 "sparse LSTM runs the reference torch path")
    return line
