"""Run time of the sparse persistent eval kernels (rnn_sparsify/kernels/persistent_eval.py)
without a GPU: the format packing against the dense masked matrix, the entry choice, the
fallback reasons, and the whole multi-layer driver (``_plan`` + ``_run``) with the kernel's
CPU twin standing in for the cubin launch, against float64 ``nn.LSTM``."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rnn_sparsify import SparseLSTM
from rnn_sparsify.codegen.manifest import KernelEntry, KernelParam, Manifest
from rnn_sparsify.codegen.persistent_sparse import PersistentSparseSpec
from rnn_sparsify.kernels import persistent_eval as pe
from rnn_sparsify.weight_sparsity import WeightSparsity, attach_weight_sparsity


def _entry(spec: PersistentSparseSpec, arch="sm_90") -> KernelEntry:
    return KernelEntry(key=f"{spec.name}-{arch}", spec=spec.to_dict(), arch=arch, symbol=spec.name + "_kernel",
                       params=tuple(KernelParam(n, dt) for n, _, dt in spec.params()), grid=(spec.grid, 1, 1),
                       block=(spec.threads, 1, 1), dynamic_smem_bytes=spec.smem_bytes(), source="k.cu",
                       cubin="k.cubin", cubin_sha256="0", launch="cooperative")


def test_pack_ell_matches_the_dense_masked_matrix():
    gen = torch.Generator().manual_seed(7)
    H = 29
    w = torch.randn(4 * H, H, generator=gen) * (torch.rand(4 * H, H, generator=gen) < 0.2)
    w[5] = 0  # a row without non-zeros
    spec = PersistentSparseSpec.make(H, 2, pe.row_nnz_max(w), "bfloat16", 4)
    Wv, Wc = pe.pack_ell(w, spec, bank_aware=False)
    assert Wv.shape == (spec.rows_total, spec.nnz) and Wv.dtype == torch.bfloat16 and Wc.dtype == torch.int16
    torch.testing.assert_close(pe.unpack_ell(Wv, Wc, spec), w.bfloat16().double(), rtol=0, atol=0)
    j, g = 3, 2  # row 4*j + g is gate g of unit j, columns ascending, then (col 0, value 0) padding
    row = w[g * H + j]
    k = int((row != 0).sum())
    assert torch.equal(Wc[4 * j + g, :k].long(), (row != 0).nonzero()[:, 0])
    assert not Wv[4 * j + g, k:].any() and not Wc[4 * j + g, k:].any()
    assert not Wv[4 * H:].any()  # rows of the padding units are empty
    with pytest.raises(ValueError, match="non-zeros"):
        pe.pack_ell(w, PersistentSparseSpec.make(H, 2, 8, "float32", 4))


def test_choose_entry_smallest_fitting():
    mk = lambda b, n, dt="bfloat16", arch="sm_90", h=64: _entry(PersistentSparseSpec.make(h, b, n, dt, 8), arch)  # noqa: E731
    entries = [mk(4, 32), mk(4, 64), mk(8, 16), mk(4, 64, "float32"), mk(4, 64, arch="sm_80"), mk(4, 64, h=32)]
    pick = lambda *a: pe.choose_entry(entries, *a)  # noqa: E731
    assert pick("sm_90", 64, 4, "bfloat16", 20).spec["nnz"] == 32
    assert pick("sm_90", 64, 3, "bfloat16", 40).spec["nnz"] == 64  # batch 3 runs padded to 4
    assert pick("sm_90", 64, 5, "bfloat16", 10).spec["batch"] == 8
    assert pick("sm_80", 64, 4, "bfloat16", 10).arch == "sm_80"
    assert pick("sm_90", 64, 4, "float32", 64).spec["dtype"] == "float32"
    assert pick("sm_90", 64, 4, "bfloat16", 65) is None  # a row denser than every bound
    assert pick("sm_90", 64, 9, "bfloat16", 1) is None
    assert "--nnz-max 65" in pe.describe_missing(entries, "sm_90", 64, 4, "bfloat16", 65)


def _pruned(I, H, sparsity=0.7, seed=0, **kw) -> SparseLSTM:
    torch.manual_seed(seed)
    m = SparseLSTM(I, H, **kw)
    attach_weight_sparsity(m, WeightSparsity("dst", total_steps=10, target_sparsity=sparsity, weights=("hh",)))
    return m.eval()


def test_cpu_module_is_unchanged_and_cuda_reasons(monkeypatch):
    monkeypatch.setattr(pe, "_config", {"path": None})
    monkeypatch.setattr(pe, "_loaded", {})
    monkeypatch.delenv(pe.ENV_VAR, raising=False)
    m = _pruned(5, 8)
    x = torch.randn(3, 2, 5)
    with torch.no_grad():
        m(x)
    assert m.last_path in ("sparse_eval", "dense")  # the CPU rule, as before this backend
    assert pe.sparse_persistent_forward(m, x) is None
    assert m.last_eval_backend == "nn.LSTM" and "run on CUDA" in m.last_eval_reason
    assert pe.why_not_static(nn.LSTM(5, 8), x, None) == "no weight sparsity"
    # no bundle / a bundle that cannot be loaded here (no GPU): a reason, never an error
    assert "no kernel bundle in use" in pe._kernels_for(torch.device("cuda", 0))


def test_unloadable_bundle_is_a_reason_with_a_warning(tmp_path, monkeypatch):
    Manifest(kernels=(), archs=("sm_90",)).save(tmp_path)
    monkeypatch.setattr(pe, "_loaded", {})
    monkeypatch.setattr(pe, "_WARNED", set())
    pe.use_bundle(tmp_path)
    try:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present: the bundle would load")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            why = pe._kernels_for(torch.device("cuda", 0))
        assert f"bundle {tmp_path} not usable on cuda:0" in why and any("runs on nn.LSTM" in str(x.message) for x in w)
    finally:
        pe.use_bundle(None)


class _TwinKernels:
    """Stands in for PersistentKernels: the entries' CPU twins instead of cubins."""

    arch = "sm_90"

    def __init__(self, specs):
        from rnn_sparsify.codegen.persistent_sparse import build_twin

        self.entries = [_entry(s) for s in specs]
        self._fn = {e.key: build_twin(s)[s.name + "_twin"] for e, s in zip(self.entries, specs)}
        self.launches = 0

    def function(self, entry):
        return self._fn[entry.key]

    def launch(self, entry, fn, **b):
        self.launches += 1
        fn(*[b[n] for n, _, _ in PersistentSparseSpec.from_dict(entry.spec).params()])


@pytest.mark.parametrize("bidirectional,batch_first,with_hx", [(True, True, True), (False, False, False)])
def test_driver_on_the_twin_matches_float64(tvm, bidirectional, batch_first, with_hx):
    I, H, L, B, T = 7, 19, 2, 3, 5
    m = _pruned(I, H, sparsity=0.7, seed=3, num_layers=L, bidirectional=bidirectional, batch_first=batch_first)
    D = 2 if bidirectional else 1
    nnz = max(pe.row_nnz_max(getattr(m, n)) for n in m._flat_weights_names if n.startswith("weight_hh"))
    assert 0 < nnz < H  # pruned rows (30 % dense)
    spec = PersistentSparseSpec.make(H, 4, nnz, "float32", 3)  # batch 3 runs padded to 4
    kernels = _TwinKernels([spec, PersistentSparseSpec.make(H, 8, nnz + 8, "float32", 3)])
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    hx = (torch.randn(L * D, B, H), torch.randn(L * D, B, H)) if with_hx else None
    with torch.no_grad():
        plan = pe._plan(m, kernels, B, "float32")
        assert not isinstance(plan, str), plan
        assert {e.spec["batch"] for e, *_ in plan.values()} == {4}
        out, (hn, cn) = pe._run(m, x.transpose(0, 1) if batch_first else x, hx, kernels, plan)
    assert kernels.launches == L * D
    ref_m = nn.LSTM(I, H, L, bidirectional=bidirectional, batch_first=batch_first).double()
    ref_m.load_state_dict({k: v for k, v in m.state_dict().items() if not k.endswith("_mask")})
    ref, (rh, rc) = ref_m(x.double(), tuple(h.double() for h in hx) if hx else None)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=3e-5)
    torch.testing.assert_close(hn.double(), rh, rtol=0, atol=3e-5)
    torch.testing.assert_close(cn.double(), rc, rtol=0, atol=1e-4)
    with torch.no_grad():  # a weight update re-packs; the same weights reuse the packed format
        assert pe._plan(m, kernels, B, "float32") is plan
        m.weight_hh_l0.mul_(0.5)
        assert pe._plan(m, kernels, B, "float32") is not plan


def test_gemm_loader_skips_persistent_entries():
    from rnn_sparsify.kernels.cuda_loader import choose_entries

    pers = _entry(PersistentSparseSpec.make(64, 4, 16, "float32", 8))
    gemm = KernelEntry(key="g", spec={"kind": "gather_k", "M": 4}, arch="sm_90", symbol="g_kernel", params=(),
                       grid=(1, 1, 1), block=(32, 1, 1), dynamic_smem_bytes=0, source="g.cu", cubin="g.cubin",
                       cubin_sha256="0")
    assert choose_entries(Manifest(kernels=(pers,), archs=("sm_90",)), "sm_90") == []
    assert choose_entries(Manifest(kernels=(pers, gemm), archs=("sm_90",)), "sm_90") == [(gemm, False)]


def test_bank_aware_order_keeps_the_matrix_and_cuts_modelled_conflicts():
    gen = torch.Generator().manual_seed(11)
    H = 1024  # ~300 non-zeros per row: ~19 per slot (the order is conflict-free until a slot runs dry)
    w = torch.randn(4 * H, H, generator=gen) * (torch.rand(4 * H, H, generator=gen) < 0.3)
    spec = PersistentSparseSpec.make(H, 4, pe.row_nnz_max(w), "bfloat16", 64)  # h[col] = 8 bytes: 16 slots
    Wv, Wc = pe.pack_ell(w, spec)
    Wv0, Wc0 = pe.pack_ell(w, spec, bank_aware=False)
    assert torch.equal(pe.unpack_ell(Wv, Wc, spec), pe.unpack_ell(Wv0, Wc0, spec))
    assert not torch.equal(Wc, Wc0)
    ba, col = pe.h_wavefronts(Wc, spec), pe.h_wavefronts(Wc0, spec)
    assert 2.0 <= ba < 0.75 * col, (ba, col)  # 2 = conflict-free for 8-byte loads


def test_h_wavefronts_model_on_a_constructed_case():
    H = 128
    w = torch.zeros(4 * H, H)
    w[:, ::16] = 1.0  # every row: columns 0, 16, ..., 112, all in slot 0 of 16
    spec = PersistentSparseSpec.make(H, 4, 8, "bfloat16", 4)
    _, Wc = pe.pack_ell(w, spec)
    # a wavefront = 2 rows x 8 lanes reading the same 8 distinct addresses of one slot: 8 passes
    assert pe.h_wavefronts(Wc, spec) == 16.0
    w2 = torch.zeros(4 * H, H)
    w2[:, :8] = 1.0  # columns 0..7: 8 different slots, shared by the 2 rows (broadcast)
    _, Wc2 = pe.pack_ell(w2, spec)
    assert pe.h_wavefronts(Wc2, spec) == 2.0


def test_refused_launch_falls_back_with_a_warning(monkeypatch):
    """A driver error at launch (e.g. a cooperative grid that is too large) is never an error:
    nn.LSTM runs, with one warning, and the device's kernels are marked unusable."""
    from rnn_sparsify.codegen.errors import BundleError

    m = _pruned(5, 8)
    x = torch.randn(3, 2, 5)

    class Kernels:
        entries, arch = [], "sm_90"

    def refuse(*a, **k):
        raise BundleError("cuLaunchCooperativeKernel(k) failed: CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE")

    monkeypatch.setattr(pe, "why_not_static", lambda *a: None)
    monkeypatch.setattr(pe, "_kernels_for", lambda dev: Kernels())
    monkeypatch.setattr(pe, "_plan", lambda *a: {})
    monkeypatch.setattr(pe, "_run", refuse)
    monkeypatch.setattr(pe, "_loaded", {})
    monkeypatch.setattr(pe, "_WARNED", set())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.warns(RuntimeWarning, match="TOO_LARGE"):
        assert pe.sparse_persistent_forward(m, x) is None
    assert m.last_eval_backend == "nn.LSTM" and "launch failed" in m.last_eval_reason
    assert any("launch failed" in v for v in pe._loaded.values())


@pytest.mark.parametrize("bidirectional,enforce_sorted,with_hx", [(True, False, True), (False, True, False),
                                                                  (True, True, False)])
def test_packed_driver_on_the_twin_matches_float64(tvm, bidirectional, enforce_sorted, with_hx):
    """PackedSequence input: one launch per run of equal active rows, state carried between
    them; output, h_n and c_n (in the caller's order) against float64 nn.LSTM on the same
    packed input."""
    from torch.nn.utils.rnn import pack_padded_sequence

    I, H, L, T = 6, 21, 2, 7
    m = _pruned(I, H, sparsity=0.7, seed=5, num_layers=L, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    nnz = max(pe.row_nnz_max(getattr(m, n)) for n in m._flat_weights_names if n.startswith("weight_hh"))
    gen = torch.Generator().manual_seed(11)
    lengths = torch.tensor([7, 7, 5, 2, 1]) if enforce_sorted else torch.tensor([2, 7, 1, 5, 7])
    B = len(lengths)
    kernels = _TwinKernels([PersistentSparseSpec.make(H, 8, nnz, "float32", 3)])
    x = torch.randn(T, B, I, generator=gen)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    hx = (torch.randn(L * D, B, H, generator=gen), torch.randn(L * D, B, H, generator=gen)) if with_hx else None
    with torch.no_grad():
        plan = pe._plan(m, kernels, B, "float32")
        assert not isinstance(plan, str), plan
        out, (hn, cn) = pe._run_packed(m, packed, hx, kernels, plan)
    assert pe._runs(packed.batch_sizes) == [(0, 1, 5), (1, 2, 4), (2, 5, 3), (5, 7, 2)]
    assert kernels.launches == L * D * 4  # one launch per run of equal batch size
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    assert out.sorted_indices is packed.sorted_indices and out.unsorted_indices is packed.unsorted_indices
    ref_m = nn.LSTM(I, H, L, bidirectional=bidirectional).double()
    ref_m.load_state_dict({k: v for k, v in m.state_dict().items() if not k.endswith("_mask")})
    ref_packed = pack_padded_sequence(x.double(), lengths, enforce_sorted=enforce_sorted)
    ref, (rh, rc) = ref_m(ref_packed, tuple(h.double() for h in hx) if hx else None)
    torch.testing.assert_close(out.data.double(), ref.data, rtol=0, atol=3e-5)
    torch.testing.assert_close(hn.double(), rh, rtol=0, atol=3e-5)
    torch.testing.assert_close(cn.double(), rc, rtol=0, atol=1e-4)


def test_hx_problem_defers_bad_state_to_nn_lstm():
    m = _pruned(5, 8, num_layers=2, bidirectional=True)
    ok = (torch.zeros(4, 3, 8), torch.zeros(4, 3, 8))
    cpu = torch.device("cpu")
    assert pe.hx_problem(m, None, 3, cpu) is None and pe.hx_problem(m, ok, 3, cpu) is None
    for bad in [(torch.zeros(2, 3, 8), torch.zeros(4, 3, 8)), (torch.zeros(4, 2, 8),) * 2, ok[:1],
                (torch.zeros(4, 3, 8), "c")]:
        assert "nn.LSTM reports the error" in pe.hx_problem(m, bad, 3, cpu)
    assert "nn.LSTM reports" in pe.hx_problem(m, ok, 3, torch.device("meta"))


def test_plan_takes_the_largest_co_resident_grid(tvm):
    """A bundle built with several --sms: the largest grid the GPU can hold co-resident runs;
    when none can, the reason of the best one is reported."""
    I, H = 5, 19
    m = _pruned(I, H, sparsity=0.7, seed=3)
    nnz = pe.row_nnz_max(m.weight_hh_l0)
    big, small = PersistentSparseSpec.make(H, 4, nnz, "float32", 5), PersistentSparseSpec.make(H, 4, nnz, "float32", 3)
    kernels = _TwinKernels([small, big])
    with torch.no_grad():
        (entry, *_), = pe._plan(m, kernels, 2, "float32").values()
    assert entry.spec["grid"] == 5
    why = "k: 5 CTAs are not co-resident on this GPU (3 SMs x 1 CTA(s) per SM by the occupancy API)"
    kernels.function = lambda e, f=kernels.function: why if e.spec["grid"] == 5 else f(e)
    pe._CACHE.pop(m, None)
    with torch.no_grad():
        (entry, *_), = pe._plan(m, kernels, 2, "float32").values()
        assert entry.spec["grid"] == 3
        kernels.function = lambda e: why
        pe._CACHE.pop(m, None)
        with pytest.warns(RuntimeWarning, match="not co-resident"):
            assert pe._plan(m, kernels, 2, "float32") == why


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_packed_words_hold_the_exact_values_and_columns(dtype):
    gen = torch.Generator().manual_seed(13)
    H = 300  # columns above 255: both bytes of the column half are used
    w = torch.randn(4 * H, H, generator=gen) * (torch.rand(4 * H, H, generator=gen) < 0.05)
    w[3, 7], w[8, 299] = -65504.0 if dtype == "float16" else -3.0e38, 2.0 ** -14  # sign bit, extremes
    spec = PersistentSparseSpec.make(H, 2, pe.row_nnz_max(w), dtype, 16, packed=True)
    Wp, none = pe.pack_ell(w, spec, bank_aware=False)
    assert none is None and Wp.dtype == torch.int32 and Wp.shape == (spec.rows_total, spec.nnz)
    torch.testing.assert_close(pe.unpack_ell(Wp, None, spec), w.to(getattr(torch, dtype)).double(), rtol=0, atol=0)
    ref_v, ref_c = pe.pack_ell(w, PersistentSparseSpec.make(H, 2, pe.row_nnz_max(w), dtype, 16), bank_aware=False)
    v, c = pe.unpack_words(Wp, getattr(torch, dtype))
    assert torch.equal(v.view(torch.int16), ref_v.view(torch.int16)) and torch.equal(c, ref_c.int())
    # the kernel's decoding: bf16 = the word with the low half cleared, read as float32
    if dtype == "bfloat16":
        assert torch.equal((Wp & -65536).view(torch.float32), ref_v.float())
    assert torch.equal(Wp & 0xFFFF, ref_c.int())
    with pytest.raises(Exception, match="packed-word format"):
        PersistentSparseSpec.make(H, 2, 8, "float32", 16, packed=True)
