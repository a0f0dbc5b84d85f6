"""Selection rules of gate-gradient sparsity (Zhu et al. 2018) and meProp's unified top-k.

Each rule takes the gate gradient ``dnet`` of one time step (``n x 4H``, rows = the batch
entries active at that step) and returns which parts to keep. The kept parts feed the
backward GEMMs in a dense-values + offset-index form (the paper's "dense matrix with an
offset index array").

Common rules (also in ``GateGradientSparsity``'s docstring and ``docs/semantics.md``):

* scores are L2 norms computed in float32 (squared norms: same order);
* ties: among equal scores the lower index is dropped first (stable ascending sort);
* non-finite scores (NaN, +-inf) rank as the largest, so they are kept and reach the loss
  scaler instead of being hidden.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import GateGradientSparsity


def _finite_scores(s: Tensor) -> Tensor:
    return torch.where(torch.isfinite(s), s, torch.full_like(s, math.inf))


def _keep_largest(scores: Tensor, drop: int) -> Tensor:
    """Indices (sorted) of all but the ``drop`` smallest entries along the last dim."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    return torch.sort(order[..., drop:], dim=-1).values


def coarse_kept_slices(dnet: Tensor, P: int, R: int, S: int) -> Tensor:
    """Kept slice numbers (sorted) for coarse sparsity: slices of ``P`` columns, regions of
    ``R`` slices, the ``S`` smallest-L2 slices of each region dropped. A last partial region
    of ``r < R`` slices drops ``floor(S * r / R)``."""
    n, C = dnet.shape
    ns = C // P
    return coarse_kept_slices_from_scores(dnet.float().reshape(n, ns, P).pow(2).sum(dim=(0, 2)), R, S)


def coarse_kept_slices_from_scores(scores: Tensor, R: int, S: int) -> Tensor:
    """:func:`coarse_kept_slices` given the squared L2 norm of every slice (``(C / P,)``)."""
    ns = scores.shape[0]
    scores = _finite_scores(scores)
    nr, rem = divmod(ns, R)
    parts = []
    if nr:
        keep = _keep_largest(scores[: nr * R].reshape(nr, R), S)
        parts.append((keep + torch.arange(nr, device=scores.device)[:, None] * R).reshape(-1))
    if rem:
        keep = _keep_largest(scores[nr * R :], (S * rem) // R)
        parts.append(keep + nr * R)
    return torch.cat(parts)


def coarse_kept_count(C: int, P: int, R: int, S: int) -> int:
    """Number of kept columns for coarse sparsity over ``C`` gate columns."""
    ns = C // P
    nr, rem = divmod(ns, R)
    return P * (nr * (R - S) + rem - (S * rem) // R)


def meprop_kept_columns(dnet: Tensor, keep: float) -> Tensor:
    """meProp's unified top-k: the ``round(keep * C)`` columns with the largest sum of
    ``|dnet|`` over the batch (sorted)."""
    C = dnet.shape[1]
    kc = meprop_kept_count(C, keep)
    scores = _finite_scores(dnet.float().abs().sum(0))
    return _keep_largest(scores, C - kc)


def meprop_kept_count(C: int, keep: float) -> int:
    return min(C, max(1, int(math.floor(keep * C + 0.5))))


def kept_columns(dnet: Tensor, cfg: GateGradientSparsity) -> Tensor:
    """Kept column indices (int64, sorted) for the column-structured modes (coarse, meprop)."""
    if cfg.mode == "coarse":
        slices = coarse_kept_slices(dnet, cfg.P, cfg.R, cfg.S)
        return (slices[:, None] * cfg.P + torch.arange(cfg.P, device=dnet.device)).reshape(-1)
    if cfg.mode == "meprop":
        return meprop_kept_columns(dnet, cfg.keep)
    raise ValueError(f"kept_columns: mode {cfg.mode!r} is not column-structured")


def kept_column_count(C: int, cfg: GateGradientSparsity) -> int:
    if cfg.mode == "coarse":
        return coarse_kept_count(C, cfg.P, cfg.R, cfg.S)
    if cfg.mode == "meprop":
        return meprop_kept_count(C, cfg.keep)
    raise ValueError(f"kept_column_count: mode {cfg.mode!r} is not column-structured")


def fine_drop_count(K: int, n: int, n0: int) -> int:
    """Sub-matrices dropped per slice at a step with ``n`` rows when the sequence's largest
    batch is ``n0``: ``floor(K * n / n0)`` (``K`` exactly when ``n == n0``)."""
    return (K * n) // n0


def check_fine_batch(cfg: GateGradientSparsity, n0: int) -> None:
    nb = -(-n0 // cfg.My)
    if cfg.K >= nb:
        raise ValueError(
            f"GateGradientSparsity.K={cfg.K} must be smaller than the {nb} sub-matrices of "
            f"My={cfg.My} rows that a slice has at batch size {n0}"
        )


def fine_kept_blocks(dnet: Tensor, My: int, Mx: int, drop: int) -> Tensor:
    """Kept row-block numbers per column slice for fine sparsity: ``(C / Mx, nb - drop)``.

    Each ``n x Mx`` slice is cut into ``nb = ceil(n / My)`` sub-matrices of ``My`` rows; a
    last partial one of ``r`` rows is scored by its L2 norm times ``sqrt(My / r)``; the
    ``drop`` smallest of each slice are dropped.
    """
    n, C = dnet.shape
    nb = -(-n // My)
    d = dnet.float()
    if nb * My != n:
        d = torch.cat([d, d.new_zeros(nb * My - n, C)])
    scores = d.reshape(nb, My, C // Mx, Mx).pow(2).sum(dim=(1, 3)).t().contiguous()  # (S, nb)
    r = n - (nb - 1) * My
    if r < My:
        scores[:, -1] *= My / r
    return _keep_largest(_finite_scores(scores), drop)


def fine_pack(dnet: Tensor, blocks: Tensor, My: int, Mx: int) -> tuple[Tensor, Tensor]:
    """Values and row numbers of the kept sub-matrices.

    Returns ``vals`` (C/Mx, kb*My, Mx) and ``rows`` (C/Mx, kb*My) indexing a copy of ``dnet``
    padded with zero rows to a multiple of ``My`` (rows >= n belong to that padding).
    """
    n, C = dnet.shape
    nb = -(-n // My)
    if nb * My != n:
        dnet = torch.cat([dnet, dnet.new_zeros(nb * My - n, C)])
    rows = (blocks[:, :, None] * My + torch.arange(My, device=dnet.device)).reshape(blocks.shape[0], -1)
    by_slice = dnet.reshape(nb * My, C // Mx, Mx).transpose(0, 1)  # (S, nb*My, Mx)
    vals = torch.gather(by_slice, 1, rows[:, :, None].expand(-1, -1, Mx))
    return vals, rows


def dense_mask(shape: tuple[int, int], cfg: GateGradientSparsity, dnet: Tensor, n0: int | None = None) -> Tensor:
    """Boolean keep-mask of ``dnet`` under ``cfg`` (for references, tests and statistics)."""
    n, C = shape
    mask = torch.zeros(n, C, dtype=torch.bool, device=dnet.device)
    if cfg.mode in ("coarse", "meprop"):
        mask[:, kept_columns(dnet, cfg)] = True
        return mask
    n0 = n if n0 is None else n0
    blocks = fine_kept_blocks(dnet, cfg.My, cfg.Mx, fine_drop_count(cfg.K, n, n0))
    nb = -(-n // cfg.My)
    full = torch.zeros(nb * cfg.My, C, dtype=torch.bool, device=dnet.device)
    _, rows = fine_pack(dnet, blocks, cfg.My, cfg.Mx)
    cols = torch.arange(C, device=dnet.device).reshape(C // cfg.Mx, cfg.Mx)
    full[rows[:, :, None], cols[:, None, :]] = True
    return full[:n]
