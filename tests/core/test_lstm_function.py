"""The sparse autograd Functions against the dense float64 reference (tests/core/_reference.py)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from rnn_sparsify import GateGradientSparsity, SparseLSTM, SparseLSTMCell, StructuredDropout
from rnn_sparsify.kernels import REFERENCE
from rnn_sparsify.lstm_function import LayerPlan, LSTMLayerFunction, draw_kept_units

from ._reference import ref_lstm, unit_mask

F64 = torch.float64


def _grads(mod, *extra):
    return [p.grad.clone() for p in mod.parameters()] + [e.grad.clone() for e in extra]


def _zero(mod):
    for p in mod.parameters():
        p.grad = None


def _run_both(mod, x, h0, c0, batch_sizes=None, gate_cfg=None, lengths=None, seed=0):
    """Run the sparse module (recording its plans), then the reference with the same plans.
    Returns ((out, h, c, grads) sparse, (...) reference)."""
    torch.manual_seed(seed)
    mod.record_plans = True
    T = x.shape[0]
    wy = torch.randn(*x.shape[:2], (mod.proj_size or mod.hidden_size) * (2 if mod.bidirectional else 1), dtype=F64)
    wh = torch.randn_like(h0)
    wc = torch.randn_like(c0)

    xs = x.clone().requires_grad_()
    hs = h0.clone().requires_grad_()
    if lengths is not None:
        packed = pack_padded_sequence(xs, lengths, enforce_sorted=False)
        out, (h, c) = mod(packed, (hs, c0))
        from torch.nn.utils.rnn import pad_packed_sequence

        y, _ = pad_packed_sequence(out, total_length=T)
    else:
        y, (h, c) = mod(xs, (hs, c0))
    loss = (y * wy).sum() + (h * wh).sum() + (c * wc).sum()
    _zero(mod)
    loss.backward()
    got = (y.detach(), h.detach(), c.detach(), _grads(mod, xs, hs))

    # reference: padded time-major in *sorted* order for packed input
    xr = x.clone().requires_grad_()
    hr = h0.clone().requires_grad_()
    if lengths is not None:
        order = torch.argsort(lengths, descending=True, stable=True)
        inv = torch.argsort(order)
        bs = [int((lengths > t).sum()) for t in range(int(lengths.max()))]
        yr, hn, cn = ref_lstm(mod, xr[:, order][: len(bs)], hr[:, order], c0[:, order], mod.last_plans, bs, gate_cfg)
        yr = torch.cat([yr, yr.new_zeros(T - len(bs), *yr.shape[1:])])[:, inv]
        hn, cn = hn[:, inv], cn[:, inv]
    else:
        yr, hn, cn = ref_lstm(mod, xr, hr, c0, mod.last_plans, None, gate_cfg)
    loss = (yr * wy).sum() + (hn * wh).sum() + (cn * wc).sum()
    _zero(mod)
    loss.backward()
    want = (yr.detach(), hn.detach(), cn.detach(), _grads(mod, xr, hr))
    return got, want


def _assert_close(got, want, tol=1e-10):
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert len(got[3]) == len(want[3])
    for a, b in zip(got[3], want[3]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, proj_size=3),
    dict(num_layers=1, bias=False),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_structured_dropout_matches_masked_reference(kw, packed):
    torch.manual_seed(1)
    mod = SparseLSTM(6, 8, dtype=F64, structured_dropout=StructuredDropout(0.5, 0.25), **kw)
    D = 2 if mod.bidirectional else 1
    T, B = 7, 5
    x = torch.randn(T, B, 6, dtype=F64)
    h0 = torch.randn(mod.num_layers * D, B, mod.proj_size or 8, dtype=F64)
    c0 = torch.randn(mod.num_layers * D, B, 8, dtype=F64)
    lengths = torch.tensor([4, 7, 1, 6, 4]) if packed else None
    got, want = _run_both(mod, x, h0, c0, lengths=lengths)
    # the masks really dropped something, both on inputs and on h_{t-1}
    assert all(p.in_idx is not None and p.rec_idx is not None for p in mod.last_plans)
    _assert_close(got, want)


@pytest.mark.parametrize(
    "cfg",
    [GateGradientSparsity.coarse(), GateGradientSparsity.coarse(P=2, R=3, S=1), GateGradientSparsity.fine(My=2, Mx=4, K=1),
     GateGradientSparsity.fine(My=4, Mx=2, K=1), GateGradientSparsity.meprop(0.4)],
    ids=lambda c: str(c.to_dict()),
)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gate_sparsity_matches_hooked_reference(cfg, packed):
    torch.manual_seed(2)
    mod = SparseLSTM(6, 12, num_layers=2, bidirectional=True, dtype=F64,
                     structured_dropout=StructuredDropout(0.3, 0.3), gate_sparsity=cfg)
    T, B = 6, 7
    x = torch.randn(T, B, 6, dtype=F64)
    h0 = torch.randn(4, B, 12, dtype=F64)
    c0 = torch.randn(4, B, 12, dtype=F64)
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4]) if packed else None
    got, want = _run_both(mod, x, h0, c0, gate_cfg=cfg, lengths=lengths)
    _assert_close(got, want)
    # the sparse gradient really differs from the dense one
    mod.set_gate_sparsity_phase(False)
    dense, _ = _run_both(mod, x, h0, c0, lengths=lengths)
    assert not torch.allclose(dense[3][0], got[3][0])


def test_p0_sparse_path_equals_nn_lstm_forward_and_grads():
    torch.manual_seed(3)
    ref = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=4, dtype=F64)
    mod = SparseLSTM.from_dense(ref, structured_dropout=StructuredDropout(0.0, 0.0))
    mod.force_sparse_path = True
    x = torch.randn(6, 3, 5, dtype=F64)
    res = []
    for m in (ref, mod):
        xx = x.clone().requires_grad_()
        y, (h, c) = m(xx)
        ((y ** 2).sum() + h.sum() + (c * 0.5).sum()).backward()
        res.append((y.detach(), h.detach(), c.detach(), [p.grad for p in m.parameters()], xx.grad))
    assert mod.last_path == "sparse"
    for a, b in zip(res[0][:3], res[1][:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(res[0][3], res[1][3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res[0][4], res[1][4], rtol=1e-12, atol=1e-12)


def test_mask_shared_across_batch_and_fresh_across_steps():
    torch.manual_seed(4)
    mod = SparseLSTM(16, 16, dtype=F64, structured_dropout=StructuredDropout(0.5, 0.5))
    mod.record_plans = True
    x = torch.randn(10, 6, 16, dtype=F64, requires_grad=True)
    y, _ = mod(x)
    y.sum().backward()
    plan = mod.last_plans[0]
    # exact count per step, and the input gradient vanishes at exactly the dropped units,
    # for every sequence of the batch
    assert plan.in_idx.shape == (10, 8) and plan.rec_idx.shape == (10, 8)
    keep = unit_mask(plan.in_idx, 16, 10, F64).bool()
    nz = x.grad.ne(0)
    assert torch.equal(nz, keep[:, None, :].expand_as(nz))
    # masks differ between steps
    assert len({tuple(r.tolist()) for r in plan.in_idx}) > 5
    assert len({tuple(r.tolist()) for r in plan.rec_idx}) > 5
    # dropped columns of W_ih / W_hh get no gradient: rows of unseen units are untouched
    seen = keep.any(0)
    assert torch.all(mod.weight_ih_l0.grad[:, ~seen] == 0)


def test_kept_units_exact_count_and_scale():
    torch.manual_seed(5)
    idx, scale = draw_kept_units(50, 10, 0.4, "cpu")
    assert idx.shape == (50, 6) and scale == pytest.approx(10 / 6)
    assert all(len(set(r.tolist())) == 6 for r in idx)
    assert draw_kept_units(3, 10, 0.0, "cpu") == (None, 1.0)
    # uniform: every unit kept with frequency close to 0.6 over many draws
    idx, _ = draw_kept_units(4000, 10, 0.4, "cpu")
    freq = torch.bincount(idx.reshape(-1), minlength=10).double() / 4000
    assert torch.all((freq - 0.6).abs() < 0.04)


def _fixed_plan(T, I, H, B, with_masks, cfg=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_idx = rec_idx = None
    if with_masks:
        in_idx = torch.sort(torch.rand(T, I, generator=g).argsort(1)[:, : I // 2], 1).values
        rec_idx = torch.sort(torch.rand(T, H, generator=g).argsort(1)[:, : H - 1], 1).values
    return LayerPlan(in_idx=in_idx, in_scale=2.0 if with_masks else 1.0, rec_idx=rec_idx,
                     rec_scale=H / (H - 1) if with_masks else 1.0, backend=REFERENCE, gate_sparsity=cfg)


@pytest.mark.parametrize("with_masks", [False, True])
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_layer_function(with_masks, proj, reverse):
    """gradcheck in float64: with fixed masks the Function is a deterministic function of
    its inputs, and its backward must be that function's exact gradient."""
    torch.manual_seed(6)
    T, B, I, H = 4, 3, 4, 3
    Hout = 2 if proj else H
    plan = _fixed_plan(T, I, Hout, B, with_masks)
    plan.reverse = reverse
    args = [
        torch.randn(T, B, I, dtype=F64, requires_grad=True),
        torch.randn(B, Hout, dtype=F64, requires_grad=True),
        torch.randn(B, H, dtype=F64, requires_grad=True),
        torch.randn(4 * H, I, dtype=F64, requires_grad=True),
        torch.randn(4 * H, Hout, dtype=F64, requires_grad=True),
        torch.randn(4 * H, dtype=F64, requires_grad=True),
        torch.randn(4 * H, dtype=F64, requires_grad=True),
        torch.randn(Hout, H, dtype=F64, requires_grad=True) if proj else None,
    ]
    assert torch.autograd.gradcheck(lambda *a: LSTMLayerFunction.apply(*a, plan), args, eps=1e-6, atol=1e-8)


def test_gradcheck_packed_batch_sizes():
    torch.manual_seed(7)
    T, B, I, H = 4, 3, 3, 2
    plan = _fixed_plan(T, I, H, B, True)
    plan.batch_sizes = [3, 2, 2, 1]
    args = [torch.randn(T, B, I, dtype=F64, requires_grad=True), torch.randn(B, H, dtype=F64, requires_grad=True),
            torch.randn(B, H, dtype=F64, requires_grad=True), torch.randn(4 * H, I, dtype=F64, requires_grad=True),
            torch.randn(4 * H, H, dtype=F64, requires_grad=True), None, None, None]
    assert torch.autograd.gradcheck(lambda *a: LSTMLayerFunction.apply(*a, plan), args, eps=1e-6, atol=1e-8)


def test_cell_matches_reference_with_masks_and_gate_sparsity():
    torch.manual_seed(8)
    cfg = GateGradientSparsity.coarse(P=2, R=4, S=2)
    cell = SparseLSTMCell(6, 8, dtype=F64, structured_dropout=StructuredDropout(0.5, 0.5), gate_sparsity=cfg)
    cell.record_plans = True
    x = torch.randn(3, 4, 6, dtype=F64)
    h = torch.randn(4, 8, dtype=F64)
    c = torch.randn(4, 8, dtype=F64)
    # three steps in a Python loop: one mask per call
    xs = x.clone().requires_grad_()
    hh, cc = h, c
    plans = []
    for t in range(3):
        hh, cc = cell(xs[t], (hh, cc))
        plans.append(cell.last_plans[0])
    (hh.sum() + (cc * 0.3).sum()).backward()
    got = [p.grad.clone() for p in cell.parameters()] + [xs.grad.clone()]
    assert any(not torch.equal(plans[0].in_idx, p.in_idx) for p in plans[1:])
    from ._reference import ref_layer

    for p in cell.parameters():
        p.grad = None
    xr = x.clone().requires_grad_()
    hh, cc = h, c
    for t in range(3):
        _, hh, cc = ref_layer(xr[t : t + 1], hh, cc, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh,
                              None, plans[t], gate_cfg=cfg)
    (hh.sum() + (cc * 0.3).sum()).backward()
    want = [p.grad.clone() for p in cell.parameters()] + [xr.grad.clone()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_nan_gradients_do_not_crash_selection():
    for cfg in (GateGradientSparsity.coarse(), GateGradientSparsity.fine(My=2, K=1), GateGradientSparsity.meprop()):
        mod = SparseLSTM(4, 8, gate_sparsity=cfg)
        y, _ = mod(torch.randn(5, 4, 4))
        g = torch.randn_like(y)
        g[2, 1, 3] = float("nan")
        g[3, 0, 0] = float("inf")
        y.backward(g)
        assert mod.weight_hh_l0.grad is not None
        # non-finite values are kept (not hidden) so a loss scaler sees them
        assert not torch.isfinite(mod.weight_ih_l0.grad).all()


def test_fine_mode_batch_too_small_raises():
    mod = SparseLSTM(4, 8, gate_sparsity=GateGradientSparsity.fine(My=8, K=4))
    y, _ = mod(torch.randn(3, 16, 4))
    with pytest.raises(ValueError, match="GateGradientSparsity.K"):
        y.sum().backward()
