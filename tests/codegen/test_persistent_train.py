"""The persistent training loops (``codegen/persistent_train.py``, issue 9 item 2): their CPU
twins (the CUDA kernels' own macros with the thread loops serial and each grid barrier a phase
boundary, built for LLVM) against a float64 autograd LSTM with the structured-dropout masks
multiplied in and coarse gate-gradient selection applied as a gradient hook
(``rnn_sparsify.gate_selection.dense_mask``), on fresh random inputs, through the host-side
packing and buffer set-up (``rnn_sparsify/kernels/persistent_train.py``)."""
from __future__ import annotations

import pytest
import torch

from rnn_sparsify import gate_selection as gsel
from rnn_sparsify.codegen.errors import UnsupportedGemm
from rnn_sparsify.codegen.persistent_train import PersistentTrainSpec, spec_for_arch
from rnn_sparsify.config import GateGradientSparsity, kept_count
from rnn_sparsify.kernels import persistent_train as pt

pytestmark = pytest.mark.tvm

_BUILT: dict = {}


def _twin(spec):
    if spec not in _BUILT:
        from rnn_sparsify.codegen.persistent_train import build_twin

        _BUILT[spec] = pt.twin_launcher(build_twin(spec)[spec.name + "_twin"], spec)
    return _BUILT[spec]


def _reference(x, h0, c0, w_ih, w_hh, b, idx, scale, dy, dhn, dcn, coarse):
    """float64 autograd, the rules by definition: y, gates, c of every step, and the selected
    dNet of every step, dh0, dc0, dW_ih, dW_hh, db."""
    T, B, _ = x.shape
    H = w_hh.shape[1]
    leaves = [v.clone().requires_grad_(True) for v in (h0, c0, w_ih, w_hh, b)]
    h, c, w_ih_, w_hh_, b_ = leaves
    mask = torch.ones(T, H, dtype=x.dtype)
    if idx is not None:
        mask.zero_().scatter_(1, idx, 1.0)
    cfg = GateGradientSparsity.coarse(*coarse) if coarse else None
    pres, ys, gates, cs = [], [], [], []
    for t in range(T):
        pre = x[t] @ w_ih_.t() + b_ + (h * mask[t] * scale) @ w_hh_.t()
        pre.retain_grad()
        if cfg is not None:
            pre.register_hook(lambda g: g * gsel.dense_mask(tuple(g.shape), cfg, g))
        i, f, g, o = pre.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        h = o * c.tanh()
        pres.append(pre)
        ys.append(h)
        gates.append(torch.cat([i, f, g, o], 1))
        cs.append(c)
    y = torch.stack(ys)
    torch.autograd.backward([y, h, c], [dy, dhn, dcn])
    dnet = torch.stack([p.grad for p in pres])  # the selected gate gradient of every step
    return (y.detach(), torch.stack(gates).detach(), torch.stack(cs).detach(), dnet,
            leaves[0].grad, leaves[1].grad, leaves[2].grad, leaves[3].grad, leaves[4].grad)


CASES = [
    # (hidden, batch, steps, p_recurrent, grid, coarse (P, R, S), dtype, extra index padding, atol)
    (37, 1, 4, 0.5, 5, (), "float32", 0, 3e-5),          # 8 units per CTA, the last 5 of 8; batch 1
    (29, 4, 5, 0.3, 4, (4, 3, 1), "float32", 2, 3e-5),   # coarse: 29 slices, a last region of 2; padded idx
    (50, 3, 3, 0.0, 7, (2, 8, 4), "float32", 0, 3e-5),   # no RH dropout; regions of 16 columns cross CTAs
    (24, 5, 4, 0.65, 3, (), "bfloat16", 0, 4e-2),        # 16-bit W, h and dNet (bf16 rounding)
]


@pytest.mark.parametrize("H,B,T,p,grid,coarse,dtype,pad,atol", CASES)
def test_twins_match_float64(tvm, H, B, T, p, grid, coarse, dtype, pad, atol):
    k = kept_count(H, p) if p else H
    fs = PersistentTrainSpec.make("fwd", H, B, k + pad, dtype, grid)
    bs = PersistentTrainSpec.make("bwd", H, B, k + pad, dtype, grid, coarse=coarse)
    _check(H, B, T, p, fs, bs, coarse, atol)


def test_twins_of_the_specs_built_for_sm90(tvm):
    """The partition the AOT build uses on sm_90 (one CTA per SM: 100 CTAs x 3 units of 300,
    a warp per unit in the backward), float32 so that the selection is comparable."""
    from rnn_sparsify.codegen.persistent_train import PersistentTrainRequest

    fs, bs = PersistentTrainRequest(300, 4, kept_count(300, 0.65), "float32", (4, 8, 4)).specs("sm_90")
    assert (fs.grid, fs.units, fs.split, bs.split) == (100, 3, 8, 32)
    _check(300, 4, 3, 0.65, fs, bs, (4, 8, 4), 3e-5)


def _check(H, B, T, p, fs, bs, coarse, atol):
    gen = torch.Generator().manual_seed(7 * H + B)
    I = 11
    f64 = dict(dtype=torch.float64)
    w_ih = torch.randn(4 * H, I, generator=gen, **f64) / I ** 0.5
    w_hh = torch.randn(4 * H, H, generator=gen, **f64) / H ** 0.5
    b = torch.randn(4 * H, generator=gen, **f64) * 0.5
    x = torch.randn(T, B, I, generator=gen, **f64)
    h0 = torch.randn(B, H, generator=gen, **f64) * 0.5
    c0 = torch.randn(B, H, generator=gen, **f64)
    dy = torch.randn(T, B, H, generator=gen, **f64)
    dhn = torch.randn(B, H, generator=gen, **f64)
    dcn = torch.randn(B, H, generator=gen, **f64)
    k = kept_count(H, p) if p else H
    idx = None
    if k < H:
        idx = torch.stack([torch.sort(torch.randperm(H, generator=gen)[:k]).values for _ in range(T)])
    scale = H / k
    y_r, gates_r, c_r, dnet_r, dh0_r, dc0_r, dwih_r, dwhh_r, db_r = _reference(
        x, h0, c0, w_ih, w_hh, b, idx, scale, dy, dhn, dcn, coarse)

    assert fs.grid * fs.units >= H
    xg = x @ w_ih.t() + b  # the input projection, outside the kernel
    y, hT, cT, saved = pt.layer_forward(xg, h0, c0, idx, scale, pt.pack_fwd_weights(w_hh, fs), fs, _twin(fs))
    tol = dict(rtol=0, atol=atol)
    torch.testing.assert_close(pt.gates(saved, fs).double(), gates_r, **tol)
    torch.testing.assert_close(pt.cells(saved, fs).double(), c_r, **tol)
    torch.testing.assert_close(y.double(), y_r, **tol)
    torch.testing.assert_close(hT.double(), y_r[-1], **tol)
    torch.testing.assert_close(cT.double(), c_r[-1], **tol)

    dnet, dh0, dc0, kept = pt.layer_backward(saved, dy, dhn, dcn, pt.pack_bwd_weights(w_hh, bs), bs, _twin(bs))
    # dNet grows backwards through time; relative to its scale
    scale_d = dnet_r.abs().max().item()
    torch.testing.assert_close(dnet.double(), dnet_r, rtol=0, atol=atol * max(1.0, scale_d))
    torch.testing.assert_close(dh0.double(), dh0_r, rtol=0, atol=atol * max(1.0, dh0_r.abs().max().item()))
    torch.testing.assert_close(dc0.double(), dc0_r, rtol=0, atol=atol * max(1.0, dc0_r.abs().max().item()))
    if coarse:
        P = coarse[0]
        ref_kept = (dnet_r.reshape(T, B, 4 * H // P, P) != 0).any(dim=(1, 3)).int()
        assert torch.equal(kept, ref_kept)
        assert (kept == 0).any()  # the selection dropped something
    # the weight gradients as one GEMM each over all steps
    hprev = torch.cat([h0[None], y_r[:-1]])
    dwih, dwhh, db = pt.weight_grads(dnet.double(), x, None, 1.0, hprev, idx, scale)
    torch.testing.assert_close(dwhh, dwhh_r, rtol=0, atol=atol * max(1.0, dwhh_r.abs().max().item()))
    torch.testing.assert_close(dwih, dwih_r, rtol=0, atol=atol * max(1.0, dwih_r.abs().max().item()))
    torch.testing.assert_close(db, db_r, rtol=0, atol=atol * max(1.0, db_r.abs().max().item()))


def test_selection_matches_gate_selection_rule():
    """The reference's kept slices above equal the rule's own function (so the comparison of
    ``kept`` checks the rule of docs/semantics.md, not just the hook)."""
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(4, 116, generator=gen, dtype=torch.float64)
    mask = gsel.dense_mask((4, 116), GateGradientSparsity.coarse(4, 3, 1), d)
    slices = gsel.coarse_kept_slices(d, 4, 3, 1)
    assert torch.equal(mask[0].reshape(29, 4).all(1).nonzero().flatten(), slices)


def test_spec_validation_and_arch_choice():
    with pytest.raises(UnsupportedGemm, match="part"):
        PersistentTrainSpec("side", 64, 4, 16, "float32", 8, 8)
    with pytest.raises(UnsupportedGemm, match="P | 4H"):
        PersistentTrainSpec.make("bwd", 10, 4, 5, "float32", 2, coarse=(3, 4, 1))
    with pytest.raises(UnsupportedGemm, match="keep"):
        PersistentTrainSpec.make("fwd", 10, 4, 11, "float32", 2)
    f = spec_for_arch("fwd", 1500, 20, 525, "bfloat16", "sm_90")
    b = spec_for_arch("bwd", 1500, 20, 525, "bfloat16", "sm_90")
    assert (f.units, f.grid, f.threads) == (12, 125, 384) and (b.units, b.grid, b.threads) == (12, 125, 384)
    assert f.smem_bytes() + 1024 <= 232448 and b.smem_bytes() + 1024 <= 232448
