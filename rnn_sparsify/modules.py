"""Drop-in sparse replacements for ``nn.LSTM`` and ``nn.LSTMCell``.

``SparseLSTM`` *is an* ``nn.LSTM`` (subclass): same constructor arguments, same parameters,
same ``state_dict`` keys and shapes, every feature (layers, bidirectional, batch_first, bias,
dropout, proj_size, h0/c0, unbatched and ``PackedSequence`` input). It adds two training-time
sparsity configs:

* ``structured_dropout``: :class:`~rnn_sparsify.config.StructuredDropout` (NR + RH, Case III);
* ``gate_sparsity``: :class:`~rnn_sparsify.config.GateGradientSparsity` (sparse ``dnet`` in the
  backward pass), switched on and off with :meth:`set_gate_sparsity_phase` (dense-after-sparse).

Path choice (``self.last_path`` records the one taken by the latest forward):

* ``"dense"``: ``eval()``, or nothing sparse is active -> ``nn.LSTM.forward`` itself (cuDNN on
  GPU). In ``eval()`` the module therefore computes exactly what ``nn.LSTM`` computes.
* ``"sparse"``: training with an active config -> the sparse autograd Functions of
  :mod:`rnn_sparsify.lstm_function` on the selected kernel backend.
* ``"persistent_eval"`` / ``"sparse_eval"``: ``eval()`` of a weight-sparse ``SparseLSTM``, by
  the eval rule list of :mod:`rnn_sparsify.kernels.eval_rules`: on CUDA the sparse persistent
  kernels of a bundle (:mod:`rnn_sparsify.kernels.persistent_eval`), on the CPU the sparse
  kernels (:mod:`rnn_sparsify.kernels.cpu_sparse_eval`); where neither applies, ``"dense"``,
  and ``last_eval_reason`` / ``last_eval_reasons`` say why.

``force_sparse_path=True`` runs the sparse Functions even when nothing is sparse (tests and
benchmarks use it to compare the two paths).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .config import GateGradientSparsity, StructuredDropout


def check_configs(structured_dropout, gate_sparsity, hidden_size: int, owner: str):
    if structured_dropout is not None and not isinstance(structured_dropout, StructuredDropout):
        raise TypeError(
            f"{owner}: structured_dropout must be a StructuredDropout, got {type(structured_dropout).__name__}"
        )
    if gate_sparsity is not None:
        if not isinstance(gate_sparsity, GateGradientSparsity):
            raise TypeError(
                f"{owner}: gate_sparsity must be a GateGradientSparsity, got {type(gate_sparsity).__name__}"
            )
        gate_sparsity.validate_for(hidden_size, owner)


def _copy_flags(src: nn.Module, dst: nn.Module) -> None:
    """``requires_grad`` of every parameter (a frozen LSTM stays frozen) and the train mode."""
    own = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        if name in own:
            own[name].requires_grad_(p.requires_grad)
    dst.train(src.training)


def _copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters, weight-sparsity masks (if any), ``requires_grad`` flags and train mode
    from ``src`` to ``dst``."""
    ws = getattr(src, "weight_sparsity", None)
    if ws is not None:
        from .weight_sparsity import attach_weight_sparsity

        attach_weight_sparsity(dst, ws)  # registers the mask buffers; the load below fills them
    dst.load_state_dict(src.state_dict())
    _copy_flags(src, dst)


def _load_parameters(dst: nn.Module, src: nn.Module) -> None:
    """Load ``src``'s state into ``dst``, keeping only the keys ``dst`` has (weight-sparsity
    masks of ``src`` are left out: ``dst`` is a plain module)."""
    keys = dst.state_dict().keys()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in keys})


class SparseMixin:
    structured_dropout: Optional[StructuredDropout]
    gate_sparsity: Optional[GateGradientSparsity]
    gate_sparsity_enabled: bool
    force_sparse_path: bool
    last_path: Optional[str]

    def _init_sparse(self, structured_dropout, gate_sparsity):
        self.structured_dropout = structured_dropout
        self.gate_sparsity = gate_sparsity
        self.gate_sparsity_enabled = True
        self.force_sparse_path = False
        self.last_path = None

    def set_gate_sparsity_phase(self, sparse: bool) -> None:
        """Dense/sparse phase switch for gate-gradient sparsity (dense-after-sparse)."""
        self.gate_sparsity_enabled = bool(sparse)

    @property
    def active_gate_sparsity(self) -> Optional[GateGradientSparsity]:
        return self.gate_sparsity if (self.gate_sparsity is not None and self.gate_sparsity_enabled) else None

    def _wants_sparse_path(self) -> bool:
        if not self.training:
            return False
        if self.force_sparse_path:
            return True
        sd = self.structured_dropout
        return (sd is not None and sd.active) or self.active_gate_sparsity is not None

    def _sparse_extra_repr(self) -> str:
        parts = []
        if self.structured_dropout is not None:
            parts.append(f"structured_dropout={self.structured_dropout}")
        if self.gate_sparsity is not None:
            parts.append(f"gate_sparsity={self.gate_sparsity}")
        return (", " + ", ".join(parts)) if parts else ""


class SparseLSTM(SparseMixin, nn.LSTM):
    """``nn.LSTM`` with structured dropout and gate-gradient sparsity (see module docstring)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        structured_dropout: Optional[StructuredDropout] = None,
        gate_sparsity: Optional[GateGradientSparsity] = None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            device=device,
            dtype=dtype,
        )
        check_configs(structured_dropout, gate_sparsity, hidden_size, "SparseLSTM")
        if structured_dropout is not None and structured_dropout.p_input > 0 and dropout > 0:
            raise ValueError(
                "SparseLSTM: set either dropout (nn.LSTM's element-wise inter-layer dropout) or "
                f"StructuredDropout.p_input, not both (dropout={dropout}, "
                f"p_input={structured_dropout.p_input})"
            )
        self._init_sparse(structured_dropout, gate_sparsity)

    # -- conversions ------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        lstm: nn.LSTM,
        structured_dropout: Optional[StructuredDropout] = None,
        gate_sparsity: Optional[GateGradientSparsity] = None,
    ) -> "SparseLSTM":
        """A ``SparseLSTM`` with ``lstm``'s hyper-parameters and a copy of its parameters.

        The copy lives on the same device/dtype; ``lstm`` is not modified. ``dropout`` is kept
        unless ``structured_dropout.p_input > 0`` replaces it (then it is set to 0).
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"SparseLSTM.from_dense expects an nn.LSTM, got {type(lstm).__name__}")
        w = lstm.weight_ih_l0
        dropout = lstm.dropout
        if structured_dropout is not None and structured_dropout.p_input > 0:
            dropout = 0.0
        new = cls(
            lstm.input_size,
            lstm.hidden_size,
            num_layers=lstm.num_layers,
            bias=lstm.bias,
            batch_first=lstm.batch_first,
            dropout=dropout,
            bidirectional=lstm.bidirectional,
            proj_size=lstm.proj_size,
            device=w.device,
            dtype=w.dtype,
            structured_dropout=structured_dropout,
            gate_sparsity=gate_sparsity,
        )
        _copy_state(lstm, new)
        return new

    def to_dense(self) -> nn.LSTM:
        """A plain ``nn.LSTM`` with the same hyper-parameters and a copy of the parameters."""
        w = self.weight_ih_l0
        dense = nn.LSTM(
            self.input_size,
            self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
            device=w.device,
            dtype=w.dtype,
        )
        _load_parameters(dense, self)
        _copy_flags(self, dense)
        return dense

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sparse_extra_repr()

    # -- forward ------------------------------------------------------------------------
    def forward(self, input, hx=None):  # noqa: D401 - same contract as nn.LSTM.forward
        if not self._wants_sparse_path():
            if not self.training and getattr(self, "weight_sparsity", None) is not None:
                from .kernels.eval_rules import PERSISTENT, eval_forward

                out = eval_forward(self, input, hx)  # the eval rule list; None: nn.LSTM
                if out is not None:
                    self.last_path = "persistent_eval" if self.last_eval_backend == PERSISTENT else "sparse_eval"
                    return out
            self.last_path = "dense"
            return super().forward(input, hx)
        self.last_path = "sparse"
        from .lstm_function import sparse_lstm_forward

        return sparse_lstm_forward(self, input, hx)


class SparseLSTMCell(SparseMixin, nn.LSTMCell):
    """``nn.LSTMCell`` with structured dropout and gate-gradient sparsity.

    For models that step a cell in a Python loop: each call is one time step, so each call
    in training draws a fresh structured-dropout mask shared by the batch.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        structured_dropout: Optional[StructuredDropout] = None,
        gate_sparsity: Optional[GateGradientSparsity] = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
        check_configs(structured_dropout, gate_sparsity, hidden_size, "SparseLSTMCell")
        self._init_sparse(structured_dropout, gate_sparsity)

    @classmethod
    def from_dense(
        cls,
        cell: nn.LSTMCell,
        structured_dropout: Optional[StructuredDropout] = None,
        gate_sparsity: Optional[GateGradientSparsity] = None,
    ) -> "SparseLSTMCell":
        if not isinstance(cell, nn.LSTMCell):
            raise TypeError(f"SparseLSTMCell.from_dense expects an nn.LSTMCell, got {type(cell).__name__}")
        w = cell.weight_ih
        new = cls(
            cell.input_size,
            cell.hidden_size,
            bias=cell.bias,
            device=w.device,
            dtype=w.dtype,
            structured_dropout=structured_dropout,
            gate_sparsity=gate_sparsity,
        )
        _copy_state(cell, new)
        return new

    def to_dense(self) -> nn.LSTMCell:
        w = self.weight_ih
        dense = nn.LSTMCell(self.input_size, self.hidden_size, bias=self.bias, device=w.device, dtype=w.dtype)
        _load_parameters(dense, self)
        _copy_flags(self, dense)
        return dense

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sparse_extra_repr()

    def forward(self, input: Tensor, hx=None):
        if not self._wants_sparse_path():
            self.last_path = "dense"
            return super().forward(input, hx)
        self.last_path = "sparse"
        from .lstm_function import sparse_lstm_cell_forward

        return sparse_lstm_cell_forward(self, input, hx)


__all__ = ["SparseLSTM", "SparseLSTMCell", "SparseMixin", "check_configs"]
