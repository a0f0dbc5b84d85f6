"""Rewrites: the sparse cell region's paths, class swaps of nn.LSTM subclasses, pickling."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from rnn_sparsify import GateGradientSparsity, SparseLSTM, StructuredDropout, sparsify
from rnn_sparsify.config import kept_count
from rnn_sparsify.passes.rewrite import dynamic_class, swap_lstm
from tests.models.cases import CellIFGO, LayerNormCell, LengthAwareLSTM, LoopedCellRNN, case

T_, B_, I_, H_ = 4, 3, 6, 8


def _inputs():
    return torch.randn(T_, B_, I_, dtype=torch.float64)


@pytest.mark.parametrize("name", ["cell_ifgo_linear_chunk", "cell_fiog_cat_split", "cell_gifo_flinear_slices"])
def test_lstm_cell_path_matches_original_forward_and_backward(name):
    """meProp with keep=1 drops nothing: the SparseLSTMCell path must give the original
    outputs and gradients, which checks the (i,f,g,o) rearrangement of the weights."""
    m, _ = case(name).factory(torch.float64)
    s = sparsify(m, GateGradientSparsity.meprop(keep=1.0))
    x = _inputs()
    m.train(), s.train()
    ref, got = m(x), s(x)
    assert s.cell.rnn_sparsify_cell_0.last_path == "sparse"
    # permuted weight rows and a summed bias: same math, different rounding order
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    ref.pow(2).sum().backward()
    got.pow(2).sum().backward()
    for (k, p), (k2, q) in zip(m.named_parameters(), s.named_parameters()):
        assert k == k2
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=k)


def test_normalised_cell_dropout_is_gather_k_of_the_original():
    """LayerNorm cell, structured dropout: each step keeps an exact number of x/h units
    (shared by the batch) with inverted scaling; recompute that with the same RNG draws."""
    m, _ = case("cell_layernorm").factory(torch.float64)
    sd = StructuredDropout(0.5, 0.25)
    s = sparsify(m, sd)
    x = _inputs()
    s.train()
    torch.manual_seed(123)
    got = s(x)
    torch.manual_seed(123)
    cell = m.cell
    h = x.new_zeros(B_, H_)
    c = x.new_zeros(B_, H_)
    outs = []
    kx_n, kh_n = kept_count(I_, 0.5), kept_count(H_, 0.25)
    for t in range(T_):
        kx = torch.randperm(I_)[:kx_n]
        kh = torch.randperm(H_)[:kh_n]
        mx = torch.zeros(I_, dtype=x.dtype).index_fill_(0, kx, I_ / kx_n)
        mh = torch.zeros(H_, dtype=x.dtype).index_fill_(0, kh, H_ / kh_n)
        # h enters only the recurrent GEMM in this cell, so masking it there is RH dropout;
        # the state carried to the next step (h') is not dropped
        _, (h, c) = cell(x[t] * mx, (h * mh, c))
        outs.append(h)
    ref = m.head(torch.stack(outs))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    e = s.rnn_sparsify_report["cell"]
    assert e.configs == [sd.to_dict()]


def test_normalised_cell_refuses_gate_sparsity_only():
    m, _ = case("cell_layernorm").factory()
    s = sparsify(m, GateGradientSparsity.coarse())
    e = s.rnn_sparsify_report["cell"]
    assert e.handling == "skipped" and "normalisation" in e.reason
    assert type(s.cell) is LayerNormCell


def test_subclass_mro_and_pickle():
    lstm = LengthAwareLSTM(4, 8, batch_first=True)
    new = swap_lstm(copy.deepcopy(lstm), StructuredDropout(0.2), None)
    cls = type(new)
    assert cls is dynamic_class(LengthAwareLSTM, "lstm")
    assert cls.__mro__[cls.__mro__.index(LengthAwareLSTM) + 1] is SparseLSTM
    assert isinstance(new, LengthAwareLSTM) and isinstance(new, SparseLSTM)
    new.train()
    x, lengths = torch.randn(2, 5, 4), torch.tensor([3, 5])
    new(x, lengths).sum().backward()
    assert new.last_path == "sparse"
    again = pickle.loads(pickle.dumps(new))
    assert type(again) is cls and again.structured_dropout == StructuredDropout(0.2)
    again.eval(), new.eval()
    torch.testing.assert_close(again(x, lengths), new(x, lengths), rtol=0, atol=0)


def test_graph_rewritten_module_keeps_class_methods_and_follows_to():
    class WithMethod(LoopedCellRNN):
        def extra(self):
            return "kept"

    m = WithMethod(CellIFGO).double()
    s = sparsify(m, StructuredDropout(0.1, 0.1))
    assert isinstance(s.cell, CellIFGO) and s.extra() == "kept"
    s.float()  # the rewritten forward reads the module's attributes at call time
    s.eval()
    assert s(_inputs().float()).dtype == torch.float32
    buf = io.BytesIO()
    torch.save(s.cell, buf)
    buf.seek(0)
    cell2 = torch.load(buf, weights_only=False)
    assert type(cell2).__name__ == "CellIFGO" and "_rnn_sparsify_fwd" in cell2.__dict__


def test_forward_guard_binds_by_signature_and_names_what_differs():
    from rnn_sparsify.passes.rewrite import ForwardGuard

    owner = nn.Module()
    owner.use_head = True
    g = ForwardGuard(("x", "hx", "lengths"), (("", "use_head", True),), types=(("x", torch.Tensor),),
                     nones=frozenset({"lengths"}))
    x = torch.zeros(1)
    assert g.bind(owner, (x, 1), {}) == (None, (x, 1, None))
    assert g.bind(owner, (x,), {"hx": 2}) == (None, (x, 2, None))
    assert "'hx' is not given" in g.bind(owner, (x,), {})[0]
    assert "'hx' is None" in g.bind(owner, (x, None), {})[0]
    assert "'lengths' is given" in g.bind(owner, (x, 1, 3), {})[0]
    assert "'x' is a list" in g.bind(owner, ([1], 1), {})[0]
    assert "repeated keyword" in g.bind(owner, (x, 1), {"x": x})[0]
    owner.use_head = False
    assert "use_head is False" in g.bind(owner, (x, 1), {})[0]
