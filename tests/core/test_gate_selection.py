"""Selection rules of gate-gradient sparsity on hand-made matrices."""
from __future__ import annotations

import math

import pytest
import torch

from rnn_sparsify import GateGradientSparsity
from rnn_sparsify import gate_selection as gs


def _cols_from_slice_norms(norms, P, n=2):
    """A dnet (n x P*len(norms)) whose slice j has L2 norm exactly norms[j]."""
    cols = []
    for v in norms:
        blk = torch.zeros(n, P)
        blk[0, 0] = v
        cols.append(blk)
    return torch.cat(cols, 1)


def test_coarse_drops_s_smallest_per_region():
    # 2 regions of R=4 slices of P=2 columns
    norms = [5, 1, 3, 2, 0.5, 9, 8, 7]
    d = _cols_from_slice_norms(norms, P=2)
    kept = gs.coarse_kept_slices(d, P=2, R=4, S=2)
    assert kept.tolist() == [0, 2, 5, 6]
    cols = gs.kept_columns(d, GateGradientSparsity.coarse(P=2, R=4, S=2))
    assert cols.tolist() == [0, 1, 4, 5, 10, 11, 12, 13]


def test_coarse_ties_drop_lower_index_first():
    d = _cols_from_slice_norms([1, 1, 1, 1], P=1)
    assert gs.coarse_kept_slices(d, P=1, R=4, S=2).tolist() == [2, 3]


def test_coarse_partial_last_region_rule():
    # 10 slices, R=4: regions of 4, 4 and a last one of 2 that drops floor(S*2/4) = 1
    norms = [4, 3, 2, 1, 1, 2, 3, 4, 7, 6]
    d = _cols_from_slice_norms(norms, P=1)
    kept = gs.coarse_kept_slices(d, P=1, R=4, S=2)
    assert kept.tolist() == [0, 1, 6, 7, 8]
    assert gs.coarse_kept_count(10, 1, 4, 2) == 5


@pytest.mark.parametrize("P,R,S,H", [(4, 8, 4, 512), (4, 8, 2, 64), (1, 4, 3, 16), (2, 16, 8, 64)])
def test_coarse_dropped_fraction_is_exactly_s_over_r(P, R, S, H):
    d = torch.randn(13, 4 * H)
    cfg = GateGradientSparsity.coarse(P=P, R=R, S=S)
    mask = gs.dense_mask(d.shape, cfg, d)
    assert mask.logical_not().float().mean().item() == pytest.approx(S / R)
    assert gs.kept_column_count(4 * H, cfg) == int(mask[0].sum())


def test_fine_drops_k_smallest_submatrices_per_slice():
    My, Mx = 2, 2
    d = torch.zeros(8, 4)  # 4 sub-matrices per slice, 2 slices
    # slice 0: block norms 3, 1, 4, 2 ; slice 1: 0, 5, 5, 1
    for b, v in enumerate([3, 1, 4, 2]):
        d[b * My, 0] = v
    for b, v in enumerate([0, 5, 5, 1]):
        d[b * My, 2] = v
    blocks = gs.fine_kept_blocks(d, My, Mx, drop=2)
    assert blocks.tolist() == [[0, 2], [1, 2]]
    cfg = GateGradientSparsity.fine(My=My, Mx=Mx, K=2)
    mask = gs.dense_mask(d.shape, cfg, d)
    expect = torch.zeros(8, 4, dtype=torch.bool)
    expect[0:2, 0:2] = expect[4:6, 0:2] = True
    expect[2:4, 2:4] = expect[4:6, 2:4] = True
    assert torch.equal(mask, expect)
    vals, rows = gs.fine_pack(d, blocks, My, Mx)
    assert rows.tolist() == [[0, 1, 4, 5], [2, 3, 4, 5]]
    torch.testing.assert_close(vals[1], d[[2, 3, 4, 5]][:, 2:4])


def test_fine_ties_drop_lower_index_first():
    d = torch.ones(6, 1)
    assert gs.fine_kept_blocks(d, 2, 1, drop=1).tolist() == [[1, 2]]


@pytest.mark.parametrize("N,My,K", [(64, 8, 4), (64, 8, 2), (32, 4, 6), (24, 8, 1)])
def test_fine_dropped_fraction_is_exactly_k_over_blocks(N, My, K):
    d = torch.randn(N, 32)
    mask = gs.dense_mask(d.shape, GateGradientSparsity.fine(My=My, Mx=4, K=K), d)
    assert mask.logical_not().float().mean().item() == pytest.approx(K / (N / My))


def test_fine_partial_block_scored_as_rms():
    # N = 5, My = 2: blocks of rows {0,1}, {2,3}, {4}. Partial block has a single row.
    d = torch.zeros(5, 1)
    d[0, 0] = 1.0  # block 0: norm 1
    d[2, 0] = 0.9  # block 1: norm 0.9
    d[4, 0] = 0.8  # block 2: norm 0.8, scaled by sqrt(2) -> 1.13: the largest
    assert gs.fine_kept_blocks(d, 2, 1, drop=1).tolist() == [[0, 2]]
    d[4, 0] = 0.6  # 0.6 * sqrt(2) = 0.85 < 0.9: now the smallest
    assert gs.fine_kept_blocks(d, 2, 1, drop=1).tolist() == [[0, 1]]


def test_fine_packed_batch_rule_scales_drop_count():
    assert gs.fine_drop_count(4, 64, 64) == 4
    assert gs.fine_drop_count(4, 40, 64) == 2  # floor(4*40/64) = floor(2.5)
    assert gs.fine_drop_count(4, 15, 64) == 0
    with pytest.raises(ValueError, match="GateGradientSparsity.K"):
        gs.check_fine_batch(GateGradientSparsity.fine(My=8, K=4), 32)


def test_meprop_unified_topk():
    d = torch.tensor([[1.0, -5.0, 0.0, 2.0], [1.0, 1.0, 0.5, -2.5]])
    # column sums of |d|: 2, 6, 0.5, 4.5 -> keep 2 of 4: columns 1 and 3
    assert gs.meprop_kept_columns(d, 0.5).tolist() == [1, 3]
    assert gs.meprop_kept_count(10, 0.25) == 3


@pytest.mark.parametrize("cfg", [GateGradientSparsity.coarse(P=1, R=4, S=2), GateGradientSparsity.fine(My=1, Mx=1, K=2),
                                 GateGradientSparsity.meprop(0.5)], ids=lambda c: c.mode)
def test_non_finite_scores_are_kept(cfg):
    d = torch.rand(4, 4) * 0.01
    d[0, 0] = math.nan
    d[1, 1] = -math.inf
    mask = gs.dense_mask(d.shape, cfg, d)
    assert mask[0, 0] and mask[1, 1]
