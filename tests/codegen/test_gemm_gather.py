"""Every generator's LLVM (CPU) build of the same two-stage algorithm the GPU runs, against
numpy float64: ragged sizes, block widths P > 1, empty index arrays, fp16/bf16/fp32."""
import secrets

import numpy as np
import pytest

from rnn_sparsify.codegen import schedule
from rnn_sparsify.codegen.errors import UnsupportedGemm
from rnn_sparsify.codegen.gemm_gather import GatherK, GatherKN, GatherRowsT, Tile, WgradT, rows_tile, spec_from_dict

from . import _numpy_ref as ref


def _np_dtype(dtype):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _run_cpu(tvm, spec, inputs):
    """Build ``spec`` for LLVM and run it; the output starts poisoned with NaN."""
    lib = tvm.compile(schedule.cpu(spec).mod, target="llvm")
    dev = tvm.cpu()
    args = []
    for name, shape, dt in spec.params():
        if name == "C":
            arr = np.full(shape, np.nan, dtype="float32")
        else:
            arr = inputs[name]
            assert arr.shape == tuple(shape), (name, arr.shape, shape)
        args.append(tvm.runtime.tensor(arr, dev))
    lib[spec.name](*args)
    return args[-1].numpy()


def _check(spec, C, expect, K):
    M, N, _ = spec.mnk
    assert np.isfinite(C).all(), "kernel left part of its (padded) output unwritten"
    assert not C[:, M:, :].any() and not C[:, :, N:].any(), "padding of the output is not zero"
    # fp32 accumulation of K products of 16-bit inputs (exact in fp32): rounding only
    np.testing.assert_allclose(C[:, :M, :N], expect, rtol=1e-4, atol=1e-5 * max(K, 1))


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(np.float32).astype(_np_dtype(dtype))


def _idx_or_dummy(idx):
    return idx if idx.shape[1] else np.zeros((idx.shape[0], 1), np.int32)


GATHER_K = [
    # T, M,  N,  K,  k, P, dtype
    (3, 20, 72, 40, 18, 1, "float16"),  # ragged everywhere
    (2, 64, 128, 64, 32, 1, "bfloat16"),  # tile-aligned
    (2, 17, 40, 48, 24, 4, "float16"),  # kept blocks of 4 (gate slices)
    (2, 9, 33, 20, 0, 1, "float16"),  # empty index array
    (1, 5, 24, 30, 11, 1, "float32"),  # single step, float32 model
]


@pytest.mark.tvm
@pytest.mark.parametrize("T,M,N,K,k,P,dtype", GATHER_K)
def test_gather_k_cpu(tvm, T, M, N, K, k, P, dtype):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    spec = GatherK(T=T, M=M, N=N, K=K, k=k, dtype=dtype, P=P)
    A, W = _rand(rng, (T, M, K), dtype), _rand(rng, (N, K), dtype)
    idx = ref.kept_blocks(rng, T, K // P, k // P)
    C = _run_cpu(tvm, spec, {"A": A, "W": W, "idx": _idx_or_dummy(idx)})
    expect = ref.gather_k(A.astype(np.float64), W.astype(np.float64), idx, P)
    _check(spec, C, expect, k)


GATHER_KN = [
    # T, M, Nw, Kw, kc,   kn,  P, Q, dtype
    (2, 20, 64, 48, 16, 24, 4, 1, "bfloat16"),  # both gathers, gate slices of 4
    (1, 13, 40, 30, None, 7, 1, 1, "float16"),  # dense dnet, output sparsity (dh of one step)
    (3, 8, 48, 36, 20, None, 1, 1, "float16"),  # column-sparse dnet only
    (2, 8, 32, 16, 0, 5, 1, 1, "float16"),  # empty dnet selection
    (2, 6, 24, 20, 12, 10, 1, 1, "float32"),
]


@pytest.mark.tvm
@pytest.mark.parametrize("T,M,Nw,Kw,kc,kn,P,Q,dtype", GATHER_KN)
def test_gather_kn_cpu(tvm, T, M, Nw, Kw, kc, kn, P, Q, dtype):
    rng = np.random.default_rng(secrets.randbits(32))
    spec = GatherKN(T=T, M=M, Nw=Nw, Kw=Kw, kc=kc, kn=kn, dtype=dtype, P=P, Q=Q)
    K = Nw if kc is None else kc
    G, W = _rand(rng, (T, M, K), dtype), _rand(rng, (Nw, Kw), dtype)
    rows = None if kc is None else ref.kept_blocks(rng, T, Nw // P, kc // P)
    cols = None if kn is None else ref.kept_blocks(rng, T, Kw // Q, kn // Q)
    inputs = {"G": G, "W": W}
    if rows is not None:
        inputs["rows"] = _idx_or_dummy(rows)
    if cols is not None:
        inputs["cols"] = _idx_or_dummy(cols)
    C = _run_cpu(tvm, spec, inputs)
    expect = ref.gather_kn(G.astype(np.float64), W.astype(np.float64), rows, cols, P, Q)
    _check(spec, C, expect, K)


WGRAD = [
    # T, B,  kc, K,  k,   P, dtype
    (3, 20, 40, 48, 24, 1, "bfloat16"),  # batch 20: ragged reduction
    (2, 32, 64, 64, None, 1, "float16"),  # column-sparse dnet, dense input
    (2, 7, 12, 40, 16, 4, "float16"),  # kept blocks of 4
    (2, 5, 8, 10, 0, 1, "float16"),  # empty index array
    (2, 6, 10, 12, 5, 1, "float32"),
]


@pytest.mark.tvm
@pytest.mark.parametrize("T,B,kc,K,k,P,dtype", WGRAD)
def test_wgrad_t_cpu(tvm, T, B, kc, K, k, P, dtype):
    rng = np.random.default_rng(secrets.randbits(32))
    spec = WgradT(T=T, B=B, kc=kc, K=K, k=k, dtype=dtype, P=P)
    G, X = _rand(rng, (T, B, kc), dtype), _rand(rng, (T, B, K), dtype)
    idx = None if k is None else ref.kept_blocks(rng, T, K // P, k // P)
    inputs = {"G": G, "X": X}
    if idx is not None:
        inputs["idx"] = _idx_or_dummy(idx)
    C = _run_cpu(tvm, spec, inputs)
    _check(spec, C, ref.wgrad_t(G.astype(np.float64), X.astype(np.float64), idx, P), B)


GATHER_ROWS = [
    # T, M,  N,   K,  k, dtype, tile
    (3, 20, 200, 50, 37, "bfloat16", None),  # ragged 4H, batch and k (zero rows, zero columns)
    (2, 64, 256, 64, 32, "float16", None),  # batch 64: 64-column tile, 2x2 warps
    (2, 9, 40, 20, 0, "bfloat16", None),  # empty selection: every row the zero row
    (2, 5, 72, 90, 70, "float16", Tile(bm=64, bn=16, bk=16, warps_m=4, warps_n=1, split_k=2)),
]


@pytest.mark.tvm
@pytest.mark.parametrize("T,M,N,K,k,dtype,tile", GATHER_ROWS)
def test_gather_rows_t_cpu(tvm, T, M, N, K, k, dtype, tile):
    """The whole-row form of the input projection: the transposed product from the padded,
    transposed operands, against GatherK's float64 reference (split-K partials summed)."""
    rng = np.random.default_rng(secrets.randbits(32))
    spec = GatherRowsT(T=T, M=M, N=N, K=K, k=k, dtype=dtype, tile=tile or rows_tile(M))
    A, W = _rand(rng, (T, M, K), dtype), _rand(rng, (N, K), dtype)
    idx = ref.kept_blocks(rng, T, K, k)
    C = _run_cpu(tvm, spec, ref.rows_operands(A, W, idx, spec.padded))
    S = spec.tile.split_k
    C = C.reshape(T, S, *C.shape[1:]).sum(1, dtype=np.float32)
    expect = ref.gather_k(A.astype(np.float64), W.astype(np.float64), idx).transpose(0, 2, 1)
    _check(spec, C, expect, k)


def test_gather_rows_t_spec():
    """4H is the GEMM's M (the tile's bm rows), the batch its N; no float32, P = 1 only."""
    s = GatherRowsT(T=35, M=20, N=2600, K=650, k=325, tile=rows_tile(20))
    assert s.mnk == (2600, 20, 325) and s.padded == (2688, 32, 352) and s.out_shape == (35, 2688, 32)
    assert s.ctas == 21 * 35 and s.k_stages == 11
    assert [p[:2] for p in s.params()] == [("Wt", (651, 2688)), ("Xt", (35, 651, 32)), ("idx", (35, 352)),
                                           ("C", (35, 2688, 32))]
    assert rows_tile(64) == Tile(bm=128, bn=64, bk=32, warps_m=2, warps_n=2)
    assert spec_from_dict(s.to_dict()) == s and s.problem != GatherK(T=35, M=20, N=2600, K=650, k=325).problem
    with pytest.raises(UnsupportedGemm, match="float16/bfloat16"):
        GatherRowsT(T=1, M=4, N=8, K=10, k=5, dtype="float32")
    with pytest.raises(UnsupportedGemm, match="exceeds"):
        GatherRowsT(T=1, M=4, N=8, K=10, k=12)


# -- spec validation and identity: pure Python ----------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GatherK(T=1, M=4, N=8, K=10, k=12), "exceeds"),
        (lambda: GatherK(T=1, M=4, N=8, K=10, k=6, P=4), "P=4 must divide"),
        (lambda: GatherK(T=1, M=4, N=8, K=10, k=6, dtype="int8"), "dtype"),
        (lambda: GatherKN(T=1, M=4, Nw=8, Kw=8, kc=None, kn=None), "dense"),
        (lambda: Tile(bm=40), "multiple of 16"),
        (lambda: Tile(bm=16, warps_m=2), "16\\*warps_m"),
        (lambda: GatherK(T=0, M=4, N=8, K=10, k=6), "T must be"),
    ],
)
def test_invalid_specs_raise(make, match):
    with pytest.raises(UnsupportedGemm, match=match):
        make()


def test_spec_dict_round_trip_and_names():
    specs = [
        GatherK(T=3, M=20, N=72, K=40, k=18, tile=Tile(bm=32, bn=64, bk=16, warps_m=1, warps_n=2)),
        GatherKN(T=1, M=5, Nw=16, Kw=12, kc=None, kn=4, dtype="float16"),
        WgradT(T=2, B=3, kc=8, K=6, k=None, dtype="float32"),
    ]
    for s in specs:
        again = spec_from_dict(s.to_dict())
        assert again == s and again.name == s.name
    assert len({s.name for s in specs}) == 3
    # the run-time lookup key ignores the tile, the kernel name does not
    a, b = GatherK(T=1, M=4, N=16, K=8, k=4), GatherK(T=1, M=4, N=16, K=8, k=4, tile=Tile(bm=16, warps_m=1))
    assert a.problem == b.problem and a.name != b.name


def test_padded_sizes():
    s = GatherK(T=2, M=20, N=130, K=40, k=18, tile=Tile(bm=64, bn=128, bk=32))
    assert s.padded == (64, 256, 32) and s.out_shape == (2, 64, 256)
    assert GatherK(T=1, M=4, N=8, K=8, k=0).padded[2] == 32  # empty K still one stage
