"""The GPU backend with coarse gate-gradient slices (``block = P > 1``): the block-indexed
kernels are used when the bundle has them, the single-row kernels or the reference otherwise;
and a whole LSTM layer's training step on the kernels of ``LSTMSpec.gemms()`` against the
reference backend. The kernels' CUDA schedules, emulated on the CPU (codegen/emulate.py), stand
in for the cubins."""
import pytest
import torch

from rnn_sparsify import gate_selection as gs
from rnn_sparsify.codegen.gemm_gather import BlockRowsData, BlockRowsWgrad, GatherKN, WgradT
from rnn_sparsify.codegen.lstm_spec import LSTMSpec
from rnn_sparsify.config import GateGradientSparsity
from rnn_sparsify.kernels import REFERENCE

pytestmark = pytest.mark.tvm

T, B, I, H, P = 3, 5, 20, 10, 4  # ragged everywhere; 4H = 40 columns = 10 slices of 4
DT = torch.float16
TOL = dict(rtol=2e-2, atol=2e-2)  # fp16 inputs: the reference multiplies in fp16, the kernel in fp32


def _emulated(tvm, specs):
    from rnn_sparsify.kernels.cuda_backend import CudaKernelBackend

    from ._emulated_bundle import EmulatedBundle

    return CudaKernelBackend(EmulatedBundle(tvm, specs), wgrad_strategy="kernel")  # the kernels, not the masked dense GEMM


def _slices(n_slices, kept, steps):
    """Kept coarse slices -> (steps, kept*P) element columns in aligned runs of P."""
    s = torch.rand(steps, n_slices).argsort(dim=1)[:, :kept].sort(dim=1).values
    return (s[:, :, None] * P + torch.arange(P)).reshape(steps, -1)


def _kept(n, k, steps=T):
    return torch.rand(steps, n).argsort(dim=1)[:, :k].sort(dim=1).values


def _r(*shape):
    return torch.randn(*shape).to(DT)


@pytest.fixture(scope="module")
def blocked(tvm):
    """Only block-indexed bwd_data kernels (P = 4) in the bundle."""
    return _emulated(tvm, [
        GatherKN(T=T, M=B, Nw=4 * H, Kw=I, kc=24, kn=9, dtype="float16", P=P),
        GatherKN(T=1, M=B, Nw=4 * H, Kw=H, kc=24, kn=None, dtype="float16", P=P),
        WgradT(T=T, B=B, kc=24, K=I, k=9, dtype="float16"),
    ])


MY, MX, NPAD = 2, 4, 6  # fine blocks of 2 x 4; batch 5 padded to 6 rows = 3 blocks per slice


@pytest.fixture(scope="module")
def fine(tvm):
    """Row-granular fine-sparsity kernels: 2 of 3 blocks kept (4 rows) and all dropped."""
    S = 4 * H // MX
    return _emulated(tvm, [
        BlockRowsData(S=S, Mx=MX, My=1, nb=NPAD, kb=4, K=I, k=9, dtype="float16"),
        BlockRowsData(S=S, Mx=MX, My=1, nb=NPAD, kb=0, K=H, k=None, dtype="float16"),
        BlockRowsWgrad(S=S, Mx=MX, My=1, kb=4, n_rows=NPAD, K=I, k=9, dtype="float16"),
        BlockRowsWgrad(S=S, Mx=MX, My=1, kb=4, n_rows=NPAD, K=H, k=None, dtype="float16"),
    ])


@pytest.fixture(scope="module")
def unblocked(tvm):
    """An older bundle: the same problems with single-row kernels (P = 1) only."""
    return _emulated(tvm, [GatherKN(T=T, M=B, Nw=4 * H, Kw=I, kc=24, kn=9, dtype="float16")])


def test_bwd_data_uses_block_kernel(blocked):
    G, w, cols, idx = _r(T, B, 24), _r(4 * H, I), _slices(10, 6, T), _kept(I, 9)
    before = blocked.bundle.launches
    out = blocked.bwd_data(G, cols, w, idx, 0.5, block=P)
    torch.testing.assert_close(out.float(), REFERENCE.bwd_data(G.float(), cols, w.float(), idx, 0.5), **TOL)
    # one step (dh), shared index vector, no output sparsity
    g1, whh, c1 = _r(B, 24), _r(4 * H, H), _slices(10, 6, 1)[0]
    out = blocked.bwd_data(g1, c1, whh, None, 2.0, block=P)
    assert out.shape == (B, H) and out.dtype == DT
    torch.testing.assert_close(out.float(), REFERENCE.bwd_data(g1.float(), c1, whh.float(), None, 2.0), **TOL)
    assert blocked.bundle.launches == before + 2
    # the same call with block=1 (element columns, e.g. meProp) needs a P = 1 kernel: not in
    # this bundle, so it runs on the reference path (and is still right)
    out = blocked.bwd_data(G, cols, w, idx, 0.5)
    assert blocked.bundle.launches == before + 2
    assert blocked.paths["bwd_data"]["reference: no kernel in bundle for this shape"] >= 1
    torch.testing.assert_close(out.float(), REFERENCE.bwd_data(G.float(), cols, w.float(), idx, 0.5), **TOL)


def test_bwd_data_block_falls_back_to_row_kernel(unblocked):
    G, w, cols, idx = _r(T, B, 24), _r(4 * H, I), _slices(10, 6, T), _kept(I, 9)
    before = unblocked.bundle.launches
    out = unblocked.bwd_data(G, cols, w, idx, 1.0, block=P)
    assert unblocked.bundle.launches == before + 1
    torch.testing.assert_close(out.float(), REFERENCE.bwd_data(G.float(), cols, w.float(), idx), **TOL)
    # a block width that does not divide the kept count (24 % 16) has no block spec: straight
    # to the P = 1 kernel
    out = unblocked.bwd_data(G, cols, w, idx, 1.0, block=16)
    assert unblocked.bundle.launches == before + 2
    torch.testing.assert_close(out.float(), REFERENCE.bwd_data(G.float(), cols, w.float(), idx), **TOL)


def test_wgrad_with_blocks(blocked):
    G, x, cols, idx = _r(T, B, 24), _r(T, B, I), _slices(10, 6, T), _kept(I, 9)
    out = torch.full((4 * H, I), 0.25, dtype=torch.float32)
    expect = out.clone()
    blocked.wgrad(G, cols, x, idx, out, 1.5, block=P)
    REFERENCE.wgrad(G.float(), cols, x.float(), idx, expect, 1.5)
    torch.testing.assert_close(out, expect, **TOL)
    assert blocked.paths["wgrad"]["kernel"] >= 1


def _fine_selection(drop):
    dnet = _r(B, 4 * H)
    blocks = gs.fine_kept_blocks(dnet, MY, MX, drop)
    return gs.fine_pack(dnet, blocks, MY, MX)  # vals (S, kb*My, Mx), rows (S, kb*My)


def test_bwd_data_blockrows(fine):
    vals, rows = _fine_selection(drop=1)
    w, idx = _r(4 * H, I), _kept(I, 9, 1)[0]
    before = fine.bundle.launches
    out = fine.bwd_data_blockrows(vals, rows, w, idx, NPAD, 0.5)
    assert out.shape == (NPAD, 9) and out.dtype == DT
    torch.testing.assert_close(
        out.float(), REFERENCE.bwd_data_blockrows(vals.float(), rows, w.float(), idx, NPAD, 0.5), **TOL)
    empty_vals, empty_rows = vals[:, :0], rows[:, :0]  # every block dropped
    whh = _r(4 * H, H)
    out = fine.bwd_data_blockrows(empty_vals, empty_rows, whh, None, NPAD)
    assert out.shape == (NPAD, H) and not out.any()
    assert fine.bundle.launches == before + 2


def test_wgrad_blockrows(fine):
    vals, rows = _fine_selection(drop=1)
    x, idx = _r(NPAD, I), _kept(I, 9, 1)[0]
    out = torch.full((4 * H, I), 0.25, dtype=torch.float32)
    expect = out.clone()
    fine.wgrad_blockrows(vals, rows, x, idx, out, 1.5)
    REFERENCE.wgrad_blockrows(vals.float(), rows, x.float(), idx, expect, 1.5)
    torch.testing.assert_close(out, expect, **TOL)
    h = _r(NPAD, H)
    out, expect = torch.zeros(4 * H, H), torch.zeros(4 * H, H)
    fine.wgrad_blockrows(vals, rows, h, None, out)
    REFERENCE.wgrad_blockrows(vals.float(), rows, h.float(), None, expect)
    torch.testing.assert_close(out, expect, **TOL)
    assert fine.paths["wgrad_blockrows"] == {"kernel": 2}


def test_blockrows_missing_kernel_falls_back(fine):
    vals, rows = _fine_selection(drop=0)  # 6 kept rows per slice: no kernel for that
    w = _r(4 * H, I)
    out = fine.bwd_data_blockrows(vals, rows, w, None, NPAD)
    torch.testing.assert_close(out, REFERENCE.bwd_data_blockrows(vals, rows, w, None, NPAD))
    assert fine.paths["bwd_data_blockrows"]["reference: no kernel in bundle for this shape"] == 1


# -- a layer's training step: every GEMM on a kernel, gradients as on the reference ---------
def _layer_grads(backend, cfg, p_in, p_h, seed, dtype=torch.float32):
    from rnn_sparsify.lstm_function import LayerPlan, LSTMLayerFunction, draw_kept_units

    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):  # drawn in float32 (same values for every dtype), then cast
        return (scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()

    x, h0, c0 = leaf(T, B, I), leaf(B, H), leaf(B, H)
    w_ih, w_hh = leaf(4 * H, I, scale=0.3), leaf(4 * H, H, scale=0.3)
    b_ih, b_hh = leaf(4 * H), leaf(4 * H)
    torch.manual_seed(seed)
    in_idx, in_scale = draw_kept_units(T, I, p_in, "cpu")
    rec_idx, rec_scale = draw_kept_units(T, H, p_h, "cpu")
    plan = LayerPlan(in_idx=in_idx, in_scale=in_scale, rec_idx=rec_idx, rec_scale=rec_scale,
                     gate_sparsity=cfg, backend=backend, record_selections=True)
    y, hn, cn = LSTMLayerFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, plan)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    (y * dy).sum().add_(hn.sum() + 0.5 * cn.sum()).backward()
    leaves = (x, h0, c0, w_ih, w_hh, b_ih)
    return [t.grad for t in leaves], plan.selections


def _lstm_backend(tvm, gate):
    spec = LSTMSpec(input_size=I, hidden_size=H, batch=B, seq_len=T, dtype="float32",
                    structured_dropout={"p_input": 0.5, "p_recurrent": 0.4}, gate_sparsity=gate)
    return _emulated(tvm, [s for _, s in spec.gemms()])


def test_lstm_step_coarse_on_block_kernels(tvm):
    gate = {"mode": "coarse", "P": P, "R": 5, "S": 2}
    backend = _lstm_backend(tvm, gate)
    assert any(s.kind == "gather_kn" and s.P == P for s in (k.spec for k in backend.bundle.kernels.values()))
    cfg = GateGradientSparsity.coarse(P=P, R=5, S=2)
    got, sel = _layer_grads(backend, cfg, 0.5, 0.4, seed=7)
    want, sel_ref = _layer_grads(REFERENCE, cfg, 0.5, 0.4, seed=7)
    # same selections (else the comparison below compares different sparse gradients)
    assert all(torch.equal(sel[t], sel_ref[t]) for t in sel_ref)
    assert all(s.numel() == gs.coarse_kept_count(4 * H, P, 5, 2) for s in sel.values())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 both sides: rounding only
    paths = backend.summary()
    for method in ("fwd_input", "fwd_recurrent", "bwd_data", "wgrad"):
        assert set(paths[method]) == {"kernel"}, (method, paths[method])


def test_lstm_step_fine_on_blockrows_kernels(tvm):
    gate = {"mode": "fine", "My": MY, "Mx": MX, "K": 1}
    backend = _lstm_backend(tvm, gate)
    cfg = GateGradientSparsity.fine(My=MY, Mx=MX, K=1)
    got, sel = _layer_grads(backend, cfg, 0.5, 0.4, seed=11)
    want, sel_ref = _layer_grads(REFERENCE, cfg, 0.5, 0.4, seed=11)
    assert all(torch.equal(sel[t], sel_ref[t]) for t in sel_ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 both sides: rounding only
    paths = backend.summary()
    for method in ("fwd_input", "fwd_recurrent", "bwd_data_blockrows", "wgrad_blockrows"):
        assert set(paths[method]) == {"kernel"}, (method, paths[method])
    assert "bwd_data" not in paths and "wgrad" not in paths


def test_lstm_step_fp16_on_the_row_kernel(tvm):
    """A 16-bit sequence spec's input projection is the whole-row kernel (GatherRowsT: 4H as M,
    transposed operands, the pipelined schedule emulated): one layer's training step with
    every GEMM on the emulated fp16 kernels against the float64 reference on the same values
    and masks (fp16 storage of activations and gradients: 2^-11 relative per rounding)."""
    spec = LSTMSpec(input_size=I, hidden_size=H, batch=B, seq_len=T, dtype="float16",
                    structured_dropout={"p_input": 0.5, "p_recurrent": 0.4})
    gemms = spec.gemms()
    specs = [s for _, s in gemms]
    # the only fwd_input kernel of the bundle is the row kernel: fwd_input on "kernel" below is it
    assert [s.kind for m, s in gemms if m == "fwd_input"] == ["gather_rows_t"], gemms
    backend = _emulated(tvm, specs)
    got, _ = _layer_grads(backend, None, 0.5, 0.4, seed=5, dtype=torch.float16)
    want, _ = _layer_grads(REFERENCE, None, 0.5, 0.4, seed=5, dtype=torch.float64)
    for a, b in zip(got, want):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2)
    paths = backend.summary()
    for method in ("fwd_input", "fwd_recurrent", "bwd_data", "wgrad"):
        assert set(paths[method]) == {"kernel"}, (method, paths[method])
