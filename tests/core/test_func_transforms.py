"""torch.func in training: LSTMLayerFunction has setup_context, so functional_call + grad work
on the sparse path (issue: 'the autograd Function lacks setup_context')."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

from rnn_sparsify import GateGradientSparsity, SparseLSTM, SparseLSTMCell, StructuredDropout


@pytest.mark.parametrize("gate", [None, GateGradientSparsity.coarse(P=4, R=4, S=2)])
def test_func_grad_equals_autograd_on_the_sparse_path(gate):
    torch.manual_seed(0)
    m = SparseLSTM(8, 8, num_layers=2, structured_dropout=StructuredDropout(0.5, 0.5), gate_sparsity=gate)
    x = torch.randn(5, 3, 8)
    params = dict(m.named_parameters())

    def loss(p):
        y, _ = functional_call(m, p, (x,))
        return (y ** 2).sum()

    torch.manual_seed(1)
    g = grad(loss)(params)
    assert m.last_path == "sparse"
    assert any("torch.func" in v for _, v in m.last_backend_reasons)  # the kernels step aside
    torch.manual_seed(1)  # the same masks
    y, _ = m(x)
    (y ** 2).sum().backward()
    for k, v in g.items():
        # float32: the plain call may run on the CPU kernels (other summation order)
        torch.testing.assert_close(v, params[k].grad, rtol=1e-5, atol=1e-6)


def test_func_grad_through_a_cell():
    torch.manual_seed(0)
    cell = SparseLSTMCell(6, 6, structured_dropout=StructuredDropout(0.5, 0.5))
    x = torch.randn(4, 6)
    g = grad(lambda p: functional_call(cell, p, (x,))[0].sum())(dict(cell.named_parameters()))
    assert set(g) == {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    assert all(torch.isfinite(v).all() for v in g.values())
