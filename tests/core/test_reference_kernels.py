"""Each named GEMM of the reference backend against a naive float64 loop over its definition."""
from __future__ import annotations

import pytest
import torch

from rnn_sparsify.kernels import REFERENCE, select_backend

F64 = torch.float64


def _idx(T, n, k, gen):
    return torch.sort(torch.rand(T, n, generator=gen).argsort(1)[:, :k], 1).values


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("k", [None, 0, 3, 7])
def test_fwd_input(gen, k):
    T, B, K, N = 4, 3, 7, 10
    x, w = torch.randn(T, B, K, dtype=F64, generator=gen), torch.randn(N, K, dtype=F64, generator=gen)
    idx = None if k is None else _idx(T, K, k, gen)
    out = REFERENCE.fwd_input(x, w, idx, alpha=1.5)
    for t in range(T):
        cols = range(K) if idx is None else idx[t].tolist()
        want = torch.zeros(B, N, dtype=F64)
        for j in cols:
            want += torch.outer(x[t, :, j], w[:, j])
        torch.testing.assert_close(out[t], 1.5 * want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [None, 0, 4])
def test_fwd_recurrent(gen, k):
    h, w = torch.randn(3, 6, dtype=F64, generator=gen), torch.randn(8, 6, dtype=F64, generator=gen)
    idx = None if k is None else _idx(1, 6, k, gen)[0]
    out = REFERENCE.fwd_recurrent(h, w, idx, alpha=2.0)
    mask = torch.zeros(6, dtype=F64)
    mask[idx if idx is not None else slice(None)] = 1
    torch.testing.assert_close(out, 2.0 * (h * mask) @ w.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kc,k", [(None, None), (4, None), (None, 3), (4, 3), (0, 3), (4, 0)])
@pytest.mark.parametrize("batched", [False, True])
def test_bwd_data(gen, kc, k, batched):
    T, M, N, K = 3, 5, 12, 6
    w = torch.randn(N, K, dtype=F64, generator=gen)
    shape = (T,) if batched else ()
    gcols = None if kc is None else (_idx(T, N, kc, gen) if batched else _idx(1, N, kc, gen)[0])
    oidx = None if k is None else (_idx(T, K, k, gen) if batched else _idx(1, K, k, gen)[0])
    g = torch.randn(*shape, M, N if kc is None else kc, dtype=F64, generator=gen)
    out = REFERENCE.bwd_data(g, gcols, w, oidx, alpha=0.5)
    for t in range(T if batched else 1):
        gt = g[t] if batched else g
        rows = range(N) if gcols is None else (gcols[t] if batched else gcols).tolist()
        cols = range(K) if oidx is None else (oidx[t] if batched else oidx).tolist()
        want = torch.zeros(M, len(cols), dtype=F64)
        for a, r in enumerate(rows):
            for b, cidx in enumerate(cols):
                want[:, b] += gt[:, a] * w[r, cidx]
        torch.testing.assert_close(out[t] if batched else out, 0.5 * want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kc,k", [(None, None), (4, None), (None, 3), (4, 3), (0, 2)])
def test_wgrad(gen, kc, k):
    T, B, N, K = 3, 5, 12, 6
    gcols = None if kc is None else _idx(T, N, kc, gen)
    xidx = None if k is None else _idx(T, K, k, gen)
    g = torch.randn(T, B, N if kc is None else kc, dtype=F64, generator=gen)
    x = torch.randn(T, B, K, dtype=F64, generator=gen)
    out = torch.randn(N, K, dtype=F64, generator=gen)
    want = out.clone()
    REFERENCE.wgrad(g, gcols, x, xidx, out, alpha=3.0)
    for t in range(T):
        rows = range(N) if gcols is None else gcols[t].tolist()
        cols = range(K) if xidx is None else xidx[t].tolist()
        for a, r in enumerate(rows):
            for cidx in cols:
                want[r, cidx] += 3.0 * (g[t, :, a] * x[t, :, cidx]).sum()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [None, 3])
def test_blockrows(gen, k):
    S, My, kb, Mx, n, K = 3, 2, 2, 4, 6, 5
    rows = torch.stack([torch.sort(torch.randperm(3, generator=gen)[:kb]).values for _ in range(S)])
    rows = (rows[:, :, None] * My + torch.arange(My)).reshape(S, -1)
    vals = torch.randn(S, kb * My, Mx, dtype=F64, generator=gen)
    dense = torch.zeros(n, S * Mx, dtype=F64)
    for s in range(S):
        dense[rows[s], s * Mx : (s + 1) * Mx] = vals[s]
    w = torch.randn(S * Mx, K, dtype=F64, generator=gen)
    idx = None if k is None else _idx(1, K, k, gen)[0]
    out = REFERENCE.bwd_data_blockrows(vals, rows, w, idx, n, alpha=2.0)
    want = 2.0 * dense @ w
    torch.testing.assert_close(out, want if idx is None else want[:, idx], rtol=1e-12, atol=1e-12)
    x = torch.randn(n, K, dtype=F64, generator=gen)
    acc = torch.randn(S * Mx, K, dtype=F64, generator=gen)
    want = acc.clone()
    REFERENCE.wgrad_blockrows(vals, rows, x, idx, acc, alpha=0.5)
    upd = 0.5 * dense.t() @ x
    if idx is None:
        want += upd
    else:
        want[:, idx] += upd[:, idx]
    torch.testing.assert_close(acc, want, rtol=1e-12, atol=1e-12)


def test_select_backend_falls_back_to_reference():
    assert select_backend(torch.device("cpu"), torch.float32) is REFERENCE
