"""CPU autocast: the sparse path returns the autocast dtype where nn.LSTM does, computed in the
parameters' float32 (no bf16 kernels on this path), with gradients in float32."""
from __future__ import annotations

import pytest
import torch

from rnn_sparsify import SparseLSTM, SparseLSTMCell, StructuredDropout, GateGradientSparsity


@pytest.mark.parametrize("bf16_input", [False, True])
@pytest.mark.parametrize("gate", [None, GateGradientSparsity.coarse()])
def test_lstm_under_cpu_autocast_matches_float32_then_cast(bf16_input, gate):
    torch.manual_seed(0)
    m = SparseLSTM(16, 16, num_layers=2, structured_dropout=StructuredDropout(0.5, 0.5), gate_sparsity=gate)
    x = torch.randn(6, 3, 16)
    xin = x.bfloat16() if bf16_input else x
    torch.manual_seed(1)
    ref, (rh, rc) = m(xin.float())  # float32, same masks (same RNG state)
    ref.sum().backward()
    gref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = m(xin)
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16  # what nn.LSTM returns under autocast
    # the same float32 computation, rounded once at the end
    assert torch.equal(y, ref.bfloat16()) and torch.equal(h, rh.bfloat16()) and torch.equal(c, rc.bfloat16())
    y.float().sum().backward()
    for p, g in zip(m.parameters(), gref):
        assert p.grad.dtype == torch.float32
        # the upstream gradient is identical (ones); only the bf16 rounding of y differs
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_cell_under_cpu_autocast():
    torch.manual_seed(0)
    cell = SparseLSTMCell(8, 8, structured_dropout=StructuredDropout(0.5, 0.5))
    x = torch.randn(4, 8)
    torch.manual_seed(2)
    rh, rc = cell(x)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = cell(x.bfloat16())
    assert h.dtype == torch.bfloat16
    # input rounded to bf16 first: compare against the float32 run on the rounded input
    torch.manual_seed(2)
    rh2, _ = cell(x.bfloat16().float())
    assert torch.equal(h, rh2.bfloat16())
    assert (h.float() - rh).abs().max() < 0.05  # bf16 input rounding only
