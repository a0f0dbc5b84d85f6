"""float64 numpy references of the indexed GEMMs, written from the semantics in
rnn_sparsify/kernels/reference.py (independent of the generators under test)."""
from __future__ import annotations

import numpy as np


def positions(idx_row: np.ndarray, P: int) -> np.ndarray:
    """Kept blocks of width P -> source positions."""
    return (idx_row[:, None].astype(np.int64) * P + np.arange(P)[None, :]).reshape(-1)


def gather_k(A, W, idx, P=1):
    """C[t] = A[t][:, pos_t] @ W[:, pos_t].T"""
    out = []
    for t in range(A.shape[0]):
        pos = positions(idx[t], P)
        out.append(A[t][:, pos].astype(np.float64) @ W[:, pos].astype(np.float64).T)
    return np.stack(out)


def gather_kn(G, W, rows=None, cols=None, P=1, Q=1):
    """C[t] = G[t] @ W[rows_t][:, cols_t]"""
    out = []
    for t in range(G.shape[0]):
        r = np.arange(W.shape[0]) if rows is None else positions(rows[t], P)
        c = np.arange(W.shape[1]) if cols is None else positions(cols[t], Q)
        out.append(G[t].astype(np.float64) @ W[np.ix_(r, c)].astype(np.float64))
    return np.stack(out)


def wgrad_t(G, X, idx=None, P=1):
    """C[t] = G[t].T @ X[t][:, pos_t]"""
    out = []
    for t in range(G.shape[0]):
        c = np.arange(X.shape[2]) if idx is None else positions(idx[t], P)
        out.append(G[t].astype(np.float64).T @ X[t][:, c].astype(np.float64))
    return np.stack(out)


def kept_blocks(rng, T: int, n_blocks: int, kept: int) -> np.ndarray:
    """(T, kept) sorted distinct block numbers per step (kept may be 0)."""
    return np.stack([np.sort(rng.choice(n_blocks, kept, replace=False)) for _ in range(T)]).astype(np.int32).reshape(T, kept)


def positions_2d(blocks: np.ndarray, P: int) -> np.ndarray:
    """(S, kb) kept blocks of width P -> (S, kb*P) positions."""
    return (blocks[:, :, None].astype(np.int64) * P + np.arange(P)).reshape(blocks.shape[0], -1)


def bwd_data_blockrows(vals, rows, W, cols, n_rows):
    """The dense dnet D (n_rows x S*Mx) with vals at their rows, zero elsewhere; D @ W[:, cols]."""
    S, r, Mx = vals.shape
    D = np.zeros((n_rows, S * Mx))
    for s in range(S):
        D[rows[s], s * Mx:(s + 1) * Mx] = vals[s]
    c = np.arange(W.shape[1]) if cols is None else cols[0]
    return D @ W[:, c]


def wgrad_blockrows(vals, rows, X, cols):
    """C[s] = vals[s].T @ X[rows[s]][:, cols]"""
    c = np.arange(X.shape[1]) if cols is None else cols[0]
    return np.stack([vals[s].T @ X[rows[s]][:, c] for s in range(vals.shape[0])])


def rows_operands(A, W, idx, padded):
    """The operands of ``GatherRowsT`` (its contract, written out here independently of the
    backend's packing): ``Wt`` = W.T zero-padded to ``Np`` columns plus a zero row ``K``;
    ``Xt[t]`` = A[t].T zero-padded to ``Mp`` columns plus a zero row ``K``; ``idx`` padded
    with ``K`` to ``Kp`` entries per step."""
    Np, Mp, Kp = padded
    T, M, K = A.shape
    N = W.shape[0]
    Wt = np.zeros((K + 1, Np), W.dtype)
    Wt[:K, :N] = W.T
    Xt = np.zeros((T, K + 1, Mp), A.dtype)
    Xt[:, :K, :M] = A.transpose(0, 2, 1)
    ip = np.full((T, Kp), K, np.int32)
    ip[:, : idx.shape[1]] = idx
    return {"Wt": Wt, "Xt": Xt, "idx": ip}
