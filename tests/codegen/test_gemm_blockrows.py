"""The fine-grained gate-sparsity generators (BlockRowsData, BlockRowsWgrad): LLVM (CPU) builds
against numpy float64 written from ReferenceBackend.bwd_data_blockrows / wgrad_blockrows:
ragged sizes, empty selections, fp16/bf16/fp32; spec validation."""
import secrets

import numpy as np
import pytest

from rnn_sparsify.codegen.errors import UnsupportedGemm
from rnn_sparsify.codegen.gemm_gather import BlockRowsData, BlockRowsWgrad, spec_from_dict

from . import _numpy_ref as ref
from .test_gemm_gather import _check, _rand, _run_cpu


def _selection(rng, S, nb, kb, My):
    """Kept row blocks per slice (S, kb), their rows (S, kb*My) and the inverse map (S, nb)."""
    blocks = ref.kept_blocks(rng, S, nb, kb)
    rows = ref.positions_2d(blocks, My)
    pos = np.full((S, nb), -1, np.int32)
    for s in range(S):
        pos[s, blocks[s]] = np.arange(kb)
    return blocks, rows, pos


def _dummy_rows(a, axis=1):
    return a if a.shape[axis] else np.zeros(a.shape[:axis] + (1,) + a.shape[axis + 1:], a.dtype)


BLOCKROWS_DATA = [
    # S, Mx, My, nb, kb, K,  k,    dtype
    (6, 4, 8, 3, 2, 20, 9, "float16"),  # ragged: 24 rows, 24 reduction columns, 9 outputs
    (8, 4, 4, 5, 3, 30, None, "bfloat16"),  # no output sparsity
    (5, 4, 8, 2, 0, 12, 6, "float16"),  # every block dropped: C = 0
    (4, 8, 2, 3, 3, 10, 4, "float32"),  # nothing dropped, float32 model, Mx = 8
]


@pytest.mark.tvm
@pytest.mark.parametrize("S,Mx,My,nb,kb,K,k,dtype", BLOCKROWS_DATA)
def test_blockrows_data_cpu(tvm, S, Mx, My, nb, kb, K, k, dtype):
    rng = np.random.default_rng(secrets.randbits(32))
    spec = BlockRowsData(S=S, Mx=Mx, My=My, nb=nb, kb=kb, K=K, k=k, dtype=dtype)
    vals, W = _rand(rng, (S, kb * My, Mx), dtype), _rand(rng, (S * Mx, K), dtype)
    _, rows, pos = _selection(rng, S, nb, kb, My)
    cols = None if k is None else ref.kept_blocks(rng, 1, K, k)
    inputs = {"V": _dummy_rows(vals), "W": W, "pos": pos}
    if cols is not None:
        inputs["cols"] = cols
    C = _run_cpu(tvm, spec, inputs)
    expect = ref.bwd_data_blockrows(vals.astype(np.float64), rows, W.astype(np.float64), cols, nb * My)
    _check(spec, C, expect[None], S * Mx)


BLOCKROWS_WGRAD = [
    # S, Mx, My, kb, n_rows, K, k,   dtype
    (6, 4, 8, 2, 24, 20, 9, "float16"),  # ragged; Mx = 4 padded to the 16-row tile
    (3, 16, 4, 3, 20, 12, None, "bfloat16"),  # no column sparsity, Mx = 16
    (4, 4, 8, 0, 16, 10, 5, "float16"),  # every block dropped: C = 0
    (5, 4, 2, 3, 8, 6, 3, "float32"),
]


@pytest.mark.tvm
@pytest.mark.parametrize("S,Mx,My,kb,n_rows,K,k,dtype", BLOCKROWS_WGRAD)
def test_blockrows_wgrad_cpu(tvm, S, Mx, My, kb, n_rows, K, k, dtype):
    rng = np.random.default_rng(secrets.randbits(32))
    spec = BlockRowsWgrad(S=S, Mx=Mx, My=My, kb=kb, n_rows=n_rows, K=K, k=k, dtype=dtype)
    vals, X = _rand(rng, (S, kb * My, Mx), dtype), _rand(rng, (n_rows, K), dtype)
    blocks, rows, _ = _selection(rng, S, n_rows // My, kb, My)
    cols = None if k is None else ref.kept_blocks(rng, 1, K, k)
    inputs = {"V": _dummy_rows(vals), "X": X, "rows": _dummy_rows(blocks)}
    if cols is not None:
        inputs["cols"] = cols
    C = _run_cpu(tvm, spec, inputs)
    expect = ref.wgrad_blockrows(vals.astype(np.float64), rows, X.astype(np.float64), cols)
    _check(spec, C, expect, max(kb * My, 1))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BlockRowsData(S=4, Mx=4, My=8, nb=2, kb=3, K=8, k=None), "exceed"),
        (lambda: BlockRowsData(S=4, Mx=4, My=8, nb=2, kb=1, K=8, k=9), "exceeds"),
        (lambda: BlockRowsWgrad(S=4, Mx=4, My=8, kb=1, n_rows=12, K=8, k=None), "multiple of My"),
        (lambda: BlockRowsWgrad(S=4, Mx=0, My=8, kb=1, n_rows=16, K=8, k=None), "Mx"),
    ],
)
def test_invalid_blockrows_specs(make, match):
    with pytest.raises(UnsupportedGemm, match=match):
        make()


def test_blockrows_round_trip():
    for s in (BlockRowsData(S=6, Mx=4, My=8, nb=3, kb=2, K=20, k=9, dtype="float16"),
              BlockRowsWgrad(S=6, Mx=4, My=8, kb=2, n_rows=24, K=20, k=None)):
        assert spec_from_dict(s.to_dict()) == s
    w = BlockRowsWgrad(S=6, Mx=4, My=8, kb=2, n_rows=24, K=20, k=9)
    assert w.T == 6 and w.out_shape == (6, 16, 128) and w.mnk == (4, 9, 16)
