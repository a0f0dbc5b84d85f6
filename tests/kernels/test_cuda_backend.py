"""The GPU backend's wrappers (index conversion, padding, alpha, dtype, scatter, fallback),
run on the CPU with each kernel's CUDA schedule, emulated (codegen/emulate.py), standing in
for the cubin; against the reference backend."""
import pytest
import torch

from rnn_sparsify.codegen.gemm_gather import GatherK, GatherKN, Tile, WgradT
from rnn_sparsify.kernels import REFERENCE

pytestmark = pytest.mark.tvm

T, B, I, H = 4, 6, 20, 12
DT = torch.float16
# the per-step kernels split-K (partials summed by the wrapper): fwd_recurrent K = 5 in two
# slices of 16 (the second all padding), dh bwd_data K = 4H = 48 in three slices of 16
SPLIT2 = Tile(bm=16, bn=32, bk=16, warps_m=1, warps_n=2, split_k=2)
SPLIT3 = Tile(bm=16, bn=32, bk=16, warps_m=1, warps_n=2, split_k=3)
# the whole-sequence dx kernel splits K too (sequence_tile): kc = 24 in two slices of 16
SEQ_SPLIT2 = Tile(bm=16, bn=32, bk=16, warps_m=1, warps_n=2, split_k=2)


@pytest.fixture(scope="module")
def backend(tvm):
    from rnn_sparsify.kernels.cuda_backend import CudaKernelBackend

    from ._emulated_bundle import EmulatedBundle

    specs = [
        GatherK(T=T, M=B, N=4 * H, K=I, k=9, dtype="float16"),
        GatherK(T=1, M=B, N=4 * H, K=H, k=5, dtype="float16", tile=SPLIT2),
        GatherKN(T=T, M=B, Nw=4 * H, Kw=I, kc=24, kn=9, dtype="float16", tile=SEQ_SPLIT2),
        GatherKN(T=1, M=B, Nw=4 * H, Kw=H, kc=None, kn=5, dtype="float16", tile=SPLIT3),
        WgradT(T=T, B=B, kc=24, K=I, k=9, dtype="float16"),
        WgradT(T=T, B=B, kc=4 * H, K=H, k=5, dtype="float16"),
    ]
    return CudaKernelBackend(EmulatedBundle(tvm, specs), wgrad_strategy="kernel")


def _kept(n, k, steps=T):
    return torch.rand(steps, n).argsort(dim=1)[:, :k].sort(dim=1).values


def _r(*shape):
    return torch.randn(*shape).to(DT)


# fp16 inputs: the reference multiplies in fp16 on the CPU, the kernel accumulates in fp32
TOL = dict(rtol=2e-2, atol=2e-2)


def test_fwd_input_and_recurrent(backend):
    x, w, idx = _r(T, B, I), _r(4 * H, I), _kept(I, 9)
    before = backend.bundle.launches
    out = backend.fwd_input(x, w, idx, 1.7)
    torch.testing.assert_close(out.float(), REFERENCE.fwd_input(x.float(), w.float(), idx, 1.7), **TOL)
    h, whh, rec = _r(B, H), _r(4 * H, H), _kept(H, 5, 1)[0]
    out = backend.fwd_recurrent(h, whh, rec, 2.0)
    assert out.shape == (B, 4 * H) and out.dtype == DT
    torch.testing.assert_close(out.float(), REFERENCE.fwd_recurrent(h.float(), whh.float(), rec, 2.0), **TOL)
    assert backend.bundle.launches == before + 2


def test_bwd_data_sequence_and_step(backend):
    G, w, cols, idx = _r(T, B, 24), _r(4 * H, I), _kept(4 * H, 24), _kept(I, 9)
    out = backend.bwd_data(G, cols, w, idx, 0.5)
    torch.testing.assert_close(out.float(), REFERENCE.bwd_data(G.float(), cols, w.float(), idx, 0.5), **TOL)
    dnet, whh, rec = _r(B, 4 * H), _r(4 * H, H), _kept(H, 5, 1)[0]
    out = backend.bwd_data(dnet, None, whh, rec, 1.0)
    assert out.shape == (B, 5)
    torch.testing.assert_close(out.float(), REFERENCE.bwd_data(dnet.float(), None, whh.float(), rec), **TOL)


def test_wgrad_accumulates_only_kept_blocks(backend):
    G, x, cols, idx = _r(T, B, 24), _r(T, B, I), _kept(4 * H, 24), _kept(I, 9)
    out = torch.full((4 * H, I), 0.25, dtype=torch.float32)
    expect = out.clone()
    backend.wgrad(G, cols, x, idx, out, 1.5)
    REFERENCE.wgrad(G.float(), cols, x.float(), idx, expect, 1.5)
    torch.testing.assert_close(out, expect, **TOL)
    G2, h, rec = _r(T, B, 4 * H), _r(T, B, H), _kept(H, 5)
    out2, expect2 = torch.zeros(4 * H, H), torch.zeros(4 * H, H)
    backend.wgrad(G2, None, h, rec, out2)
    REFERENCE.wgrad(G2.float(), None, h.float(), rec, expect2)
    torch.testing.assert_close(out2, expect2, **TOL)


def test_missing_kernel_falls_back_and_says_why(backend):
    x, w, idx = _r(T + 1, B, I), _r(4 * H, I), _kept(I, 9, T + 1)  # T not in the bundle
    before = backend.bundle.launches
    out = backend.fwd_input(x, w, idx)
    torch.testing.assert_close(out, REFERENCE.fwd_input(x, w, idx))
    assert backend.bundle.launches == before
    assert backend.paths["fwd_input"]["reference: no kernel in bundle for this shape"] >= 1
    backend.fwd_input(x.float(), w.float(), idx)  # float32 not in the bundle either
    dense = backend.fwd_input(x, w, None)  # dense: cuBLAS via the reference
    torch.testing.assert_close(dense, REFERENCE.fwd_input(x, w, None))
    assert backend.paths["fwd_input"]["reference: dense or unsupported rank"] >= 1
    assert backend.summary()["fwd_input"]["kernel"] >= 1


@pytest.mark.parametrize("g_sparse,x_sparse", [(True, True), (False, True), (True, False)])
def test_masked_dense_wgrad_equals_the_reference_in_float64(g_sparse, x_sparse):
    from rnn_sparsify.kernels.cuda_backend import masked_dense_wgrad

    g = torch.randn(T, B, 24 if g_sparse else 4 * H, dtype=torch.float64)
    cols = _kept(4 * H, 24) if g_sparse else None
    x, idx = torch.randn(T, B, I, dtype=torch.float64), (_kept(I, 9) if x_sparse else None)
    out = torch.randn(4 * H, I, dtype=torch.float64)
    expect = out.clone()
    REFERENCE.wgrad(g, cols, x, idx, expect, 0.7)
    masked_dense_wgrad(g, cols, x, idx, out, 0.7)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    # a 1-D kept set (the same for every step) too
    if x_sparse:
        out, expect = torch.zeros(4 * H, I, dtype=torch.float64), torch.zeros(4 * H, I, dtype=torch.float64)
        REFERENCE.wgrad(g, cols, x, idx[0].expand(T, -1), expect)  # the reference takes (T, k)
        masked_dense_wgrad(g, cols, x, idx[0], out)
        torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


def test_default_wgrad_strategy_is_the_masked_dense_gemm_and_env_chooses(tvm, monkeypatch):
    from rnn_sparsify.kernels.cuda_backend import WGRAD_ENV_VAR, CudaKernelBackend

    from ._emulated_bundle import EmulatedBundle

    bundle = EmulatedBundle(tvm, [WgradT(T=T, B=B, kc=24, K=I, k=9, dtype="float16")])
    be = CudaKernelBackend(bundle)
    G, x, cols, idx = _r(T, B, 24), _r(T, B, I), _kept(4 * H, 24), _kept(I, 9)
    out, expect = torch.zeros(4 * H, I), torch.zeros(4 * H, I)
    before = bundle.launches
    be.wgrad(G, cols, x, idx, out, 1.5)
    REFERENCE.wgrad(G.float(), cols, x.float(), idx, expect, 1.5)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert bundle.launches == before and be.paths["wgrad"]["masked dense GEMM"] == 1
    monkeypatch.setenv(WGRAD_ENV_VAR, "kernel")
    be = CudaKernelBackend(bundle)
    be.wgrad(G, cols, x, idx, torch.zeros(4 * H, I), 1.5)
    assert bundle.launches == before + 1 and be.paths["wgrad"]["kernel"] == 1
    monkeypatch.setenv(WGRAD_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="masked_dense, kernel"):
        CudaKernelBackend(bundle)


def test_mixed_dtypes_take_no_kernel(backend):
    """Under torch.autocast a float32 model's weights stay float32 while an activation may come
    in float16: no kernel matches (``compile``'s dtype note for float32 models relies on it)."""
    x, w, idx = _r(T, B, I), _r(4 * H, I).float(), _kept(I, 9)
    before = dict(backend.paths["fwd_input"])
    spec = lambda dt: GatherK(T=T, M=B, N=4 * H, K=I, k=9, dtype=dt)  # noqa: E731 - in the bundle as float16
    assert backend._kernel("fwd_input", spec, (x, w)) is None
    assert backend.paths["fwd_input"]["reference: dtype"] == before.get("reference: dtype", 0) + 1
    assert backend._kernel("fwd_input", spec, (x, w.to(DT))) is not None  # one dtype: the kernel


def test_step_kernels_run_split_k(backend):
    """The per-step kernels above are split-K: their launches write (S, Mp, Np) partials that
    the wrapper sums (the comparisons in test_fwd_input_and_recurrent / test_bwd_data_... see
    only the sum; slice 0 alone is off: tests/codegen/test_emulate_schedule.py)."""
    splits = sorted(k.spec.tile.split_k for k in backend.bundle.kernels.values() if k.spec.T == 1)
    assert splits == [2, 3]
    seq = [k for k in backend.bundle.kernels.values() if k.spec.kind == "gather_kn" and k.spec.T == T]
    assert [k.spec.tile.split_k for k in seq] == [2]  # the sequence dx (T steps x 2 slices)
    for k in backend.bundle.kernels.values():
        assert k.out_shape[0] == k.spec.T * k.spec.tile.split_k


# -- the whole-row input projection (GatherRowsT: transposed operands, cp.async on the GPU) --
@pytest.fixture(scope="module")
def rows_backend(tvm):
    from rnn_sparsify.codegen.gemm_gather import GatherRowsT, rows_tile
    from rnn_sparsify.kernels.cuda_backend import CudaKernelBackend

    from ._emulated_bundle import EmulatedBundle

    specs = [GatherRowsT(T=T, M=B, N=4 * H, K=I, k=9, dtype="float16", tile=rows_tile(B)),
             GatherK(T=T, M=B, N=4 * H, K=I, k=9, dtype="float16")]  # both: the row kernel wins
    return CudaKernelBackend(EmulatedBundle(tvm, specs))


def test_fwd_input_takes_the_row_kernel(rows_backend):
    """Against the reference; dropped input units hold inf (the kernel reads only kept rows and
    the zero rows it pads with); an in-place ``.data`` write to the weight is seen by the next
    call (the transposed copy is rebuilt per call, never cached)."""
    x, w, idx = _r(T, B, I), _r(4 * H, I), _kept(I, 9)
    dropped = torch.ones(T, I, dtype=torch.bool).scatter_(1, idx, False)
    x.masked_fill_(dropped[:, None, :].expand(T, B, I), float("inf"))
    bundle = rows_backend.bundle
    before = bundle.launches
    out = rows_backend.fwd_input(x, w, idx, 1.3)
    assert out.shape == (T, B, 4 * H) and out.dtype == DT and out.is_contiguous()
    xs = x.float().masked_fill(dropped[:, None, :].expand(T, B, I), 0.0)
    torch.testing.assert_close(out.float(), REFERENCE.fwd_input(xs, w.float(), idx, 1.3), **TOL)
    w.data.mul_(-2.0)
    torch.testing.assert_close(rows_backend.fwd_input(x, w, idx).float(), REFERENCE.fwd_input(xs, w.float(), idx), **TOL)
    assert bundle.launches == before + 2
    used = {k.spec.kind: k for k in bundle.kernels.values()}
    assert rows_backend.paths["fwd_input"]["kernel"] == 2 and set(used) == {"gather_rows_t", "gather_k"}


def test_rows_operands_layout():
    """The packing itself, element by element: rows of W.T and x[t].T, zero padding, pad index K."""
    from rnn_sparsify.kernels.cuda_backend import rows_operands

    x, w, idx = torch.randn(2, 3, 5), torch.randn(8, 5), torch.tensor([[0, 3], [4, 1]])
    ops = rows_operands(x, w, idx, (16, 16, 32))
    assert ops["Wt"].shape == (6, 16) and ops["Xt"].shape == (2, 6, 16) and ops["idx"].shape == (2, 32)
    torch.testing.assert_close(ops["Wt"][:5, :8], w.t(), rtol=0, atol=0)
    torch.testing.assert_close(ops["Xt"][1, :5, :3], x[1].t(), rtol=0, atol=0)
    assert not ops["Wt"][5].any() and not ops["Wt"][:, 8:].any() and not ops["Xt"][:, 5].any() and not ops["Xt"][:, :, 3:].any()
    assert ops["idx"][:, :2].tolist() == idx.tolist() and (ops["idx"][:, 2:] == 5).all() and ops["idx"].dtype == torch.int32
