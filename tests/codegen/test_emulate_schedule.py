"""The CUDA schedules themselves, run on the CPU (``codegen/emulate.py``): the tensor-core
schedule with scalar stand-ins for ldmatrix / mma.sync / fill / store that follow the PTX
register layouts and the project's shared-memory offsets, the float32 SIMT schedule as is,
thread loops serial, built for LLVM -- against numpy float64 on fresh random data, for every
kernel kind ``lstm_spec`` emits. Planted bugs in the offset formula, the ``.trans`` flag and
the fragment layout must fail the same comparison (the twins of ``test_gemm_gather.py`` build
the unscheduled function and cannot see them)."""
import secrets

import numpy as np
import pytest

from rnn_sparsify.codegen.gemm_gather import (BlockRowsData, BlockRowsWgrad, GatherK, GatherKN, GatherRowsT, Tile, WgradT,
                                              rows_tile)

from . import _numpy_ref as ref
from .test_gemm_blockrows import _dummy_rows, _selection
from .test_gemm_gather import _check, _idx_or_dummy, _rand

pytestmark = pytest.mark.tvm


def _case(rng, spec):
    """(inputs by parameter name, float64 expected product, reduction length) for ``spec``."""
    dt = spec.dtype
    names = {n for n, _, _ in spec.params()}
    if spec.kind == "gather_k":
        A, W = _rand(rng, (spec.T, spec.M, spec.K), dt), _rand(rng, (spec.N, spec.K), dt)
        idx = ref.kept_blocks(rng, spec.T, spec.K // spec.P, spec.k // spec.P)
        expect = ref.gather_k(A.astype(np.float64), W.astype(np.float64), idx, spec.P)
        return {"A": A, "W": W, "idx": _idx_or_dummy(idx)}, expect, spec.k
    if spec.kind == "gather_rows_t":
        A, W = _rand(rng, (spec.T, spec.M, spec.K), dt), _rand(rng, (spec.N, spec.K), dt)
        idx = ref.kept_blocks(rng, spec.T, spec.K, spec.k)
        expect = ref.gather_k(A.astype(np.float64), W.astype(np.float64), idx).transpose(0, 2, 1)
        return ref.rows_operands(A, W, idx, spec.padded), expect, spec.k
    if spec.kind == "gather_kn":
        K = spec.mnk[2]
        G, W = _rand(rng, (spec.T, spec.M, K), dt), _rand(rng, (spec.Nw, spec.Kw), dt)
        rows = ref.kept_blocks(rng, spec.T, spec.Nw // spec.P, spec.kc // spec.P) if "rows" in names else None
        cols = ref.kept_blocks(rng, spec.T, spec.Kw // spec.Q, spec.kn // spec.Q) if "cols" in names else None
        inputs = {"G": G, "W": W}
        if rows is not None:
            inputs["rows"] = _idx_or_dummy(rows)
        if cols is not None:
            inputs["cols"] = _idx_or_dummy(cols)
        expect = ref.gather_kn(G.astype(np.float64), W.astype(np.float64), rows, cols, spec.P, spec.Q)
        return inputs, expect, K
    if spec.kind == "wgrad_t":
        G, X = _rand(rng, (spec.T, spec.B, spec.kc), dt), _rand(rng, (spec.T, spec.B, spec.K), dt)
        idx = ref.kept_blocks(rng, spec.T, spec.K // spec.P, spec.k // spec.P) if spec.k is not None else None
        inputs = {"G": G, "X": X}
        if idx is not None:
            inputs["idx"] = _idx_or_dummy(idx)
        return inputs, ref.wgrad_t(G.astype(np.float64), X.astype(np.float64), idx, spec.P), spec.B
    if spec.kind == "blockrows_data":
        S, My = spec.S, spec.My
        vals, W = _rand(rng, (S, spec.kb * My, spec.Mx), dt), _rand(rng, (S * spec.Mx, spec.K), dt)
        _, rows, pos = _selection(rng, S, spec.nb, spec.kb, My)
        cols = ref.kept_blocks(rng, 1, spec.K, spec.k) if spec.k is not None else None
        inputs = {"V": _dummy_rows(vals), "W": W, "pos": pos}
        if cols is not None:
            inputs["cols"] = cols
        expect = ref.bwd_data_blockrows(vals.astype(np.float64), rows, W.astype(np.float64), cols, spec.nb * My)
        return inputs, expect[None], S * spec.Mx
    if spec.kind == "blockrows_wgrad":
        S, My = spec.S, spec.My
        vals, X = _rand(rng, (S, spec.kb * My, spec.Mx), dt), _rand(rng, (spec.n_rows, spec.K), dt)
        blocks, rows, _ = _selection(rng, S, spec.n_rows // My, spec.kb, My)
        cols = ref.kept_blocks(rng, 1, spec.K, spec.k) if spec.k is not None else None
        inputs = {"V": _dummy_rows(vals), "X": X, "rows": _dummy_rows(blocks)}
        if cols is not None:
            inputs["cols"] = cols
        expect = ref.wgrad_blockrows(vals.astype(np.float64), rows, X.astype(np.float64), cols)
        return inputs, expect, max(spec.kb * My, 1)
    raise AssertionError(f"no test case for kernel kind {spec.kind!r}")


def _run_emulated(tvm, spec, inputs):
    """Build ``spec``'s CUDA schedule for the CPU and run it; the output starts poisoned with NaN."""
    from rnn_sparsify.codegen import emulate

    lib = emulate.build(spec)
    dev = tvm.cpu()
    args = []
    for name, shape, dt in spec.params():
        arr = np.full(shape, np.nan, np.float32) if name == "C" else inputs[name]
        assert name == "C" or arr.shape == tuple(shape), (name, arr.shape, shape)
        args.append(tvm.runtime.tensor(arr, dev))
    lib[spec.name](*args)
    return args[-1].numpy()


def _summed(spec, C):
    """The ``(T, Mp, Np)`` product from a split-K kernel's ``(T * S, Mp, Np)`` partials (row
    ``t * S + s``), summed in fp32 as ``CudaKernelBackend._run`` does; unsplit: ``C``."""
    S = spec.tile.split_k
    assert C.shape == spec.out_shape
    return C.reshape(spec.T, S, *C.shape[1:]).sum(1, dtype=np.float32) if S > 1 else C


# Every kind the generator emits (lstm_spec: fwd_input, fwd_recurrent, bwd_data (dx, dh),
# wgrad, bwd_data_blockrows, wgrad_blockrows), both 16-bit dtypes, both operand layouts of
# each family (GatherK: B stored [n, k]; WgradT / BlockRowsWgrad: A stored [k, m]), ragged and
# tile-aligned sizes (the aligned ones take the 16-byte vectorized copies), other tiles.
SPECS = {
    "fwd_input_bf16_ragged": GatherK(T=3, M=20, N=72, K=40, k=18, dtype="bfloat16"),
    "fwd_input_fp16_gate_blocks": GatherK(T=2, M=17, N=40, K=48, k=24, P=4, dtype="float16"),
    "fwd_input_bf16_aligned_vec": GatherK(T=2, M=64, N=128, K=64, k=32, P=8, dtype="bfloat16"),
    "fwd_recurrent_fp16_two_n_tiles": GatherK(T=1, M=20, N=150, K=72, k=40, dtype="float16"),
    "fwd_fp16_empty_selection": GatherK(T=2, M=9, N=33, K=20, k=0, dtype="float16"),
    "fwd_bf16_tile_1x2_warps": GatherK(T=2, M=40, N=70, K=50, k=36, dtype="bfloat16",
                                       tile=Tile(bm=32, bn=64, bk=16, warps_m=1, warps_n=2)),
    "fwd_fp16_tile_4x4_frags_per_warp": GatherK(T=1, M=50, N=60, K=90, k=70, dtype="float16",
                                                tile=Tile(bm=64, bn=64, bk=32, warps_m=1, warps_n=1)),
    "bwd_data_dx_bf16_coarse": GatherKN(T=2, M=20, Nw=64, Kw=48, kc=16, kn=24, P=4, dtype="bfloat16"),
    "bwd_data_dh_fp16_dense_dnet": GatherKN(T=1, M=13, Nw=40, Kw=30, kc=None, kn=7, dtype="float16"),
    "bwd_data_fp16_dnet_only": GatherKN(T=3, M=8, Nw=48, Kw=36, kc=20, kn=None, dtype="float16"),
    "bwd_data_bf16_aligned_vec": GatherKN(T=1, M=64, Nw=64, Kw=256, kc=32, kn=128, Q=8, dtype="bfloat16"),
    "wgrad_bf16_ragged_batch": WgradT(T=3, B=20, kc=40, K=48, k=24, dtype="bfloat16"),
    "wgrad_fp16_dense_input_vec": WgradT(T=2, B=32, kc=64, K=64, k=None, dtype="float16"),
    "wgrad_fp16_gate_blocks": WgradT(T=2, B=7, kc=12, K=40, k=16, P=4, dtype="float16"),
    "blockrows_data_bf16": BlockRowsData(S=6, Mx=4, My=8, nb=3, kb=2, K=20, k=9, dtype="bfloat16"),
    "blockrows_data_fp16_rows": BlockRowsData(S=10, Mx=4, My=1, nb=24, kb=16, K=30, k=None, dtype="float16"),
    "blockrows_wgrad_fp16_rows": BlockRowsWgrad(S=10, Mx=4, My=1, kb=16, n_rows=24, K=20, k=9, dtype="float16"),
    "blockrows_wgrad_bf16_mx16": BlockRowsWgrad(S=3, Mx=16, My=4, kb=3, n_rows=20, K=12, k=None, dtype="bfloat16"),
    # split-K (Tile.split_k, the per-step kernels' tiles): one CTA per K slice, partials summed;
    # ragged K with the last slice part padding, a sequence (T > 1: step = row // S), SIMT
    "fwd_recurrent_fp16_split_k3": GatherK(T=1, M=20, N=150, K=72, k=40, dtype="float16",
                                           tile=Tile(bm=32, bn=64, bk=16, warps_m=2, warps_n=2, split_k=3)),
    "bwd_data_dh_bf16_split_k4": GatherKN(T=1, M=13, Nw=120, Kw=30, kc=None, kn=7, dtype="bfloat16",
                                          tile=Tile(bm=16, bn=64, bk=16, warps_m=1, warps_n=2, split_k=4)),
    "bwd_data_bf16_coarse_seq_split_k2": GatherKN(T=2, M=20, Nw=64, Kw=48, kc=16, kn=24, P=4, dtype="bfloat16",
                                                  tile=Tile(bm=32, bn=32, bk=16, warps_m=2, warps_n=1, split_k=2)),
    # the whole-sequence dx tile (LSTMSpec.gemms: sequence_tile): 32x64, 4 slices of 2 stages
    "bwd_data_dx_bf16_sequence_tile": GatherKN(T=4, M=20, Nw=256, Kw=80, kc=None, kn=40, dtype="bfloat16",
                                               tile=Tile(bm=32, bn=64, bk=32, warps_m=2, warps_n=2, split_k=4)),
    "fwd_bf16_aligned_vec_split_k2": GatherK(T=1, M=64, N=128, K=128, k=64, P=8, dtype="bfloat16",
                                             tile=Tile(bm=64, bn=64, bk=16, warps_m=2, warps_n=2, split_k=2)),
    # whole-row gathers (4H as M, transposed operands, 16-byte copies in a 3-stage software
    # pipeline: cp.async on the GPU, synchronous here): batch 20 (4x1 warps), 64 (2x2), a
    # 16-column tile with 4 K stages, split-K
    "fwd_input_rows_bf16": GatherRowsT(T=3, M=20, N=200, K=50, k=37, dtype="bfloat16", tile=rows_tile(20)),
    "fwd_input_rows_fp16_b64": GatherRowsT(T=2, M=64, N=136, K=80, k=40, dtype="float16", tile=rows_tile(64)),
    "fwd_input_rows_bf16_b16_4_stages": GatherRowsT(T=2, M=12, N=100, K=150, k=100, dtype="bfloat16",
                                                    tile=rows_tile(12)),
    "fwd_input_rows_fp16_split_k2": GatherRowsT(T=2, M=20, N=72, K=90, k=70, dtype="float16",
                                                tile=Tile(bm=64, bn=32, bk=16, warps_m=2, warps_n=1, split_k=2)),
    # float32 models: the SIMT schedule (shared tiles, a register tile per thread)
    "fwd_fp32_simt": GatherK(T=2, M=20, N=72, K=40, k=18, dtype="float32"),
    "bwd_data_fp32_simt": GatherKN(T=2, M=6, Nw=24, Kw=20, kc=12, kn=10, dtype="float32"),
    "wgrad_fp32_simt": WgradT(T=2, B=6, kc=10, K=12, k=5, dtype="float32"),
    "blockrows_data_fp32_simt": BlockRowsData(S=4, Mx=8, My=2, nb=3, kb=3, K=10, k=4, dtype="float32"),
    "blockrows_wgrad_fp32_simt": BlockRowsWgrad(S=10, Mx=4, My=8, kb=2, n_rows=24, K=48, k=None, dtype="float32"),
    "fwd_fp32_simt_split_k2": GatherK(T=2, M=20, N=72, K=40, k=18, dtype="float32",
                                      tile=Tile(bm=32, bn=64, bk=16, split_k=2)),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_schedule_on_cpu(tvm, name):
    spec = SPECS[name]
    rng = np.random.default_rng(secrets.randbits(32))
    inputs, expect, K = _case(rng, spec)
    _check(spec, _summed(spec, _run_emulated(tvm, spec, inputs)), expect, K)


def test_every_emitted_kind_is_covered():
    """The table above holds every generator in every dtype (a new kind must be added)."""
    from rnn_sparsify.codegen.gemm_gather import DTYPES, GENERATORS

    covered = {(s.kind, s.dtype) for s in SPECS.values()}
    # GatherRowsT is tensor-core only (float32 takes GatherK's SIMT kernel)
    assert covered == {(kind, dt) for kind in GENERATORS for dt in DTYPES} - {("gather_rows_t", "float32")}


def test_emulation_runs_the_cuda_schedule(tvm):
    """What is built is the tensorized, thread-bound schedule (serialized), not the plain function."""
    from rnn_sparsify.codegen import emulate

    spec = SPECS["wgrad_bf16_ragged_batch"]
    mod, n_threads = emulate.schedule_for_cpu(spec)
    text = mod.script()
    # warps (threadIdx.y) and lanes (threadIdx.x) of the copies, fragments, mma and store
    assert n_threads >= 5
    assert "T.thread_binding" not in text and '"shared"' not in text and '"warp"' not in text
    assert text.count("for tx, i, j in T.grid(32, 4, 2)") >= 2  # the two emulated ldmatrix.x4


# -- planted bugs: the same comparison must fail, by a wide margin ----------------------
def _bad_offset(good):
    def smem_offset(tx, stride, transposed):  # swaps the two 8-lane halves of the address list
        return good((tx + 8) % 32, stride, transposed)

    return smem_offset


def _flipped_trans(good):
    return lambda operand, transposed: not good(operand, transposed)


def _bad_layout(good):
    def layout(i, j):  # the C fragment's register pairs in the wrong order (not PTX's)
        t, l = good(i, j)
        return t, (l + 2) % 8

    return layout


BUGS = {"ldmatrix_smem_offset": _bad_offset, "ldmatrix_trans": _flipped_trans, "ldmatrix_layout": _bad_layout}


@pytest.mark.parametrize("bug", list(BUGS))
@pytest.mark.parametrize("name", ["fwd_input_bf16_ragged", "wgrad_fp16_gate_blocks", "fwd_input_rows_bf16"])
def test_planted_bug_fails(tvm, monkeypatch, bug, name):
    from rnn_sparsify.codegen import intrin

    spec = SPECS[name]
    # register the real CUDA intrinsics first, so the broken formula cannot leak into them
    intrin.tensor_core_intrins(spec.dtype, spec.a_trans, spec.b_trans)
    monkeypatch.setattr(intrin, bug, BUGS[bug](getattr(intrin, bug)))
    rng = np.random.default_rng(secrets.randbits(32))
    inputs, expect, K = _case(rng, spec)
    M, N, _ = spec.mnk
    C = _summed(spec, _run_emulated(tvm, spec, inputs))[:, :M, :N]
    err = np.nanmax(np.abs(C - expect)) if np.isfinite(C).any() else np.inf
    # a correct kernel is within ~1e-5 * K here (test_cuda_schedule_on_cpu); a broken one is
    # off by the size of the products themselves
    assert not np.isfinite(C).all() or err > 0.1 * np.abs(expect).max(), f"{bug}: max|err| {err:.2e} went unnoticed"


def _overlapping_slices(good):
    def slice_(self, tt, r):  # slice s starts one bk stage early: stages overlap, the last is lost
        t, j = good(self, tt, r)
        S = self.tile.split_k
        return t, j - (tt % S) * self.tile.bk if S > 1 else j

    return slice_


@pytest.mark.parametrize("name", ["fwd_recurrent_fp16_split_k3", "bwd_data_dh_bf16_split_k4",
                                  "bwd_data_dx_bf16_sequence_tile", "fwd_input_rows_fp16_split_k2"])
def test_planted_split_k_offset_bug_fails(tvm, monkeypatch, name):
    """A K-slice offset off by one ``bk`` stage (slices overlap, the last stage is never
    read) fails the float64 comparison; so does summing only the first slice's partial."""
    from rnn_sparsify.codegen.gemm_gather import IndexedGemm

    spec = SPECS[name]
    rng = np.random.default_rng(secrets.randbits(32))
    inputs, expect, K = _case(rng, spec)
    M, N, _ = spec.mnk
    good = _run_emulated(tvm, spec, inputs)
    first_only = good.reshape(spec.T, spec.tile.split_k, *good.shape[1:])[:, 0, :M, :N]
    assert np.abs(first_only - expect).max() > 0.1 * np.abs(expect).max()
    monkeypatch.setattr(IndexedGemm, "_slice", _overlapping_slices(IndexedGemm._slice))
    C = _summed(spec, _run_emulated(tvm, spec, inputs))[:, :M, :N]
    err = np.abs(C - expect).max()
    assert err > 0.1 * np.abs(expect).max(), f"overlapping K slices: max|err| {err:.2e} went unnoticed"


# -- production shapes (slow: T = 35, H = 650) -------------------------------------------
def _production_specs():
    """Every distinct GEMM of the README's 650x650 LSTM, batch 20, 35 steps, bf16, p = 0.5, with
    no / coarse / fine gate sparsity (bf16 only: LLVM emulates fp16 arithmetic in software,
    5x slower; the small table above covers fp16)."""
    from rnn_sparsify.codegen.lstm_spec import LSTMSpec

    base = dict(input_size=650, hidden_size=650, batch=20, seq_len=35, dtype="bfloat16",
                structured_dropout={"p_input": 0.5, "p_recurrent": 0.5})
    specs, seen = {}, set()
    for label, gate in (("sd", None), ("sd_coarse", {"mode": "coarse", "P": 4, "R": 8, "S": 4}),
                        ("sd_fine", {"mode": "fine", "My": 8, "Mx": 4, "K": 1})):
        for method, spec in LSTMSpec(**base, gate_sparsity=gate).gemms():
            if spec.name not in seen:
                seen.add(spec.name)
                specs[f"{label}:{method}:{spec.name}"] = spec
    return specs


PRODUCTION = _production_specs()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRODUCTION))
def test_production_shapes_on_cpu(tvm, name):
    """The README's 650x650, batch 20, 35 steps at p = 0.5 (+ coarse / fine gate sparsity):
    every GEMM ``rnn-sparsify compile`` builds for it."""
    spec = PRODUCTION[name]
    rng = np.random.default_rng(secrets.randbits(32))
    inputs, expect, K = _case(rng, spec)
    _check(spec, _summed(spec, _run_emulated(tvm, spec, inputs)), expect, K)


def test_emulation_keeps_the_software_pipeline(tvm):
    """The whole-row kernel's K loop is emulated pipelined (stages, order: multi-buffered
    shared tiles) without its async stage (cp.async -> serial copies, see emulate.serialize)."""
    from rnn_sparsify.codegen import emulate, schedule

    spec = SPECS["fwd_input_rows_bf16_b16_4_stages"]
    ann = schedule.pipeline_annotations(spec.pipeline_stages)
    assert ann["software_pipeline_async_stages"] == [0]
    assert '"software_pipeline_async_stages"' in schedule.tensorcore(spec).mod.script()
    text = emulate.schedule_for_cpu(spec)[0].script()
    assert f'"software_pipeline_stage": {ann["software_pipeline_stage"]}' in text
    assert "software_pipeline_async_stages" not in text and "T.vectorized(8)" in text
