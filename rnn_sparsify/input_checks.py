"""Input checks of the sparse training path that mirror ``nn.LSTM`` / ``nn.LSTMCell`` exactly.

The sparse autograd Functions would accept (or fail cryptically on) inputs that PyTorch's own
modules refuse. These helpers raise the same exception type with the same message as the
dense module, so a model behaves the same in training and in ``eval()``:

* :func:`check_lstm_cell_args` raises ATen's ``lstm_cell`` errors (``input has inconsistent
  input_size``, ``Input batch size 2 doesn't match hidden0 batch size 3``, ...) with their
  words: checked in Python for 2-D tensors (a few microseconds; the tests compare them with
  ``nn.LSTMCell``'s), by running ``_VF.lstm_cell`` on *meta* tensors (no arithmetic) for
  other dimensions.
* :func:`check_lstm_sequence` refuses a sequence of length 0 as ``_VF.lstm`` does.
* :func:`check_lstm_packed`: ``nn.LSTM`` checks a ``PackedSequence`` only inside ``_VF.lstm``
  (its errors are those of the first GEMM); on a shape mismatch the dense forward itself is
  run, so the error is PyTorch's, word for word.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_lstm_cell_args", "check_lstm_sequence", "check_lstm_packed"]


def _meta(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else torch.empty_like(t, device="meta")


def check_lstm_cell_args(mod, input: Tensor, hx=None) -> None:
    """``nn.LSTMCell.forward``'s checks on ``input`` (1-D or 2-D) and ``hx`` (or None)."""
    if input.dim() not in (1, 2):
        raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
    if hx is not None:
        for idx, value in enumerate(hx):
            if value.dim() not in (1, 2):
                raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
    x = input if input.dim() == 2 else input.unsqueeze(0)
    if hx is None:
        h = torch.empty(x.shape[0], mod.hidden_size, dtype=x.dtype, device="meta")
        hx = (h, h)
    elif input.dim() == 1:
        hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
    if all(t.dim() == 2 for t in hx):  # the common case, checked in Python: ATen's words
        if x.shape[1] != mod.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {mod.input_size}")
        for k, t in enumerate(hx):
            if x.shape[0] != t.shape[0]:
                raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match hidden{k} batch size {t.shape[0]}")
            if t.shape[1] != mod.hidden_size:
                raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {t.shape[1]}, expected "
                                   f"{mod.hidden_size}")
        return
    # anything else (e.g. unbatched input with a batched hx): ATen's own checks on meta tensors
    b_ih = mod.bias_ih if mod.bias else None
    b_hh = mod.bias_hh if mod.bias else None
    with torch.no_grad():
        torch._VF.lstm_cell(_meta(x), (_meta(hx[0]), _meta(hx[1])), _meta(mod.weight_ih), _meta(mod.weight_hh),
                            _meta(b_ih), _meta(b_hh))


def check_lstm_sequence(x: Tensor) -> None:
    """``nn.LSTM``'s check on a (time-major) padded input ``x``: at least one time step."""
    if x.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")


def check_lstm_packed(mod, input, hx=None) -> None:
    """``nn.LSTM``'s errors for a ``PackedSequence`` ``input`` whose feature size, or whose
    ``hx`` shapes, do not fit ``mod``: raised by running ``nn.LSTM.forward`` itself."""
    data, batch_sizes = input.data, input.batch_sizes
    bad = data.dim() != 2 or data.shape[-1] != mod.input_size
    if hx is not None and not bad:
        D = 2 if mod.bidirectional else 1
        B = int(batch_sizes[0])
        R = mod.proj_size if mod.proj_size > 0 else mod.hidden_size
        bad = (tuple(hx[0].shape) != (mod.num_layers * D, B, R)
               or tuple(hx[1].shape) != (mod.num_layers * D, B, mod.hidden_size))
    if bad:
        torch.nn.LSTM.forward(mod, input, hx)  # raises nn.LSTM's own error
