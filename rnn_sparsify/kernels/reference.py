"""The indexed GEMMs of a sparse LSTM, by name, with PyTorch reference implementations.

Every GEMM the sparse LSTM autograd Functions run goes through one method of a backend
object; a faster backend (the TVM-generated kernels of ``rnn_sparsify.codegen``) subclasses
:class:`ReferenceBackend` and overrides the methods it has kernels for, calling ``super()``
for shapes it cannot take. The reference methods really skip the work: they gather the kept
rows/columns into smaller dense operands and multiply those, they never multiply by a mask.

Index conventions (all index tensors are int64, on the operands' device):

* ``idx`` of shape ``(k,)`` is shared by the whole call; of shape ``(T, k)`` it is per time
  step and the operands carry a leading ``T`` dimension (batched over the sequence).
* ``None`` means "all" (the dense case, which runs as one plain GEMM).
* ``block`` (on the gate-gradient GEMMs) says that ``g_cols`` comes in runs of ``block``
  consecutive columns starting at multiples of ``block`` (coarse sparsity's slices of P
  columns); a backend may use block-indexed kernels. The reference ignores it.

Weights are in PyTorch layout: ``w`` is ``(N, K)`` with ``N = 4*hidden`` gate rows.
``alpha`` scales the product (inverted-dropout scaling is folded in there).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _rows(w: Tensor, idx: Tensor) -> Tensor:
    """``w[idx]`` for ``idx`` of shape (k,) or (T, k): (…, k, K). index_select, not advanced
    indexing (several times faster on CPU)."""
    return w.index_select(0, idx.reshape(-1)).reshape(*idx.shape, w.shape[1])


def _cols(w: Tensor, idx: Tensor) -> Tensor:
    """``w[:, idx]`` transposed to ``(…, k, N)`` for ``idx`` of shape (k,) or (T, k)."""
    return _rows(w.t().contiguous() if idx.dim() > 1 else w.t(), idx)


def _take_last(a: Tensor, idx: Tensor) -> Tensor:
    """``a[..., idx]`` along the last dim; ``idx`` (k,) shared or (T, k) per leading index."""
    if idx.dim() == 1:
        return a.index_select(-1, idx)
    shape = list(a.shape[:-1]) + [idx.shape[-1]]
    view = idx.reshape(idx.shape[0], *([1] * (a.dim() - 2)), idx.shape[-1])
    return torch.gather(a, -1, view.expand(shape))


class ReferenceBackend:
    """PyTorch reference kernels (CPU and GPU through torch ops)."""

    name = "reference"

    # -- forward -----------------------------------------------------------------------
    def fwd_input(self, x: Tensor, w: Tensor, idx: Tensor | None, alpha: float = 1.0) -> Tensor:
        """Input projection of a whole sequence, skipping dropped input columns (gather-K).

        ``x``: (T, B, K); ``w``: (N, K); ``idx``: None or (T, k).
        Returns (T, B, N) with ``out[t] = alpha * x[t][:, idx[t]] @ w[:, idx[t]].T``.
        """
        if idx is None:
            out = torch.matmul(x, w.t())
        else:
            out = torch.bmm(_take_last(x, idx), _cols(w, idx))
        return out if alpha == 1.0 else out.mul_(alpha)

    def fwd_recurrent(self, h: Tensor, w: Tensor, idx: Tensor | None, alpha: float = 1.0) -> Tensor:
        """One recurrent step, skipping dropped units of ``h_{t-1}`` (gather-K).

        ``h``: (B, K); ``w``: (N, K); ``idx``: None or (k,). Returns (B, N) =
        ``alpha * h[:, idx] @ w[:, idx].T``.
        """
        if idx is None:
            out = h @ w.t()
        else:
            out = h.index_select(1, idx) @ w.index_select(1, idx).t()
        return out if alpha == 1.0 else out.mul_(alpha)

    # -- backward-data ------------------------------------------------------------------
    def bwd_data(
        self,
        g: Tensor,
        g_cols: Tensor | None,
        w: Tensor,
        out_idx: Tensor | None,
        alpha: float = 1.0,
        block: int = 1,
    ) -> Tensor:
        """Backward-data with a column-sparse gate gradient and output sparsity (gather-K, gather-N).

        ``g``: (…, M, kc), the kept columns of ``dnet`` (all 4H columns if ``g_cols`` is None);
        ``g_cols``: None or (…, kc), which rows of ``w`` they belong to; ``w``: (N, K);
        ``out_idx``: None or (…, k), the only output columns to compute.
        Returns (…, M, k) = ``alpha * g @ w[g_cols][:, out_idx]``.
        """
        if g_cols is None and out_idx is not None and out_idx.dim() == 2:
            # (T, k, N) @ (T, N, M) -> transpose: avoids copying a transposed (T, N, k) gather
            out = torch.bmm(_cols(w, out_idx), g.transpose(1, 2)).transpose(1, 2)
            return out if alpha == 1.0 else out.mul_(alpha)
        if g_cols is not None:
            w = _rows(w, g_cols)  # (…, kc, K)
        if out_idx is not None:
            if w.dim() == 2 and out_idx.dim() == 2:
                w = _cols(w, out_idx).transpose(-1, -2)  # (T, N, k)
            else:
                w = _take_last(w, out_idx)
        out = torch.matmul(g, w)
        return out if alpha == 1.0 else out.mul_(alpha)

    # -- weight gradient ----------------------------------------------------------------
    def wgrad(
        self,
        g: Tensor,
        g_cols: Tensor | None,
        x: Tensor,
        x_idx: Tensor | None,
        out: Tensor,
        alpha: float = 1.0,
        block: int = 1,
    ) -> None:
        """Weight gradient of a whole sequence, accumulated in place (gather-M / scatter rows).

        ``g``: (T, B, kc) kept ``dnet`` columns; ``g_cols``: None or (T, kc);
        ``x``: (T, B, K) the GEMM's input; ``x_idx``: None or (T, k) its kept columns;
        ``out``: (N, K). For every t: ``out[g_cols[t]][:, x_idx[t]] += alpha * g[t].T @ x[t][:, x_idx[t]]``.
        Rows and columns outside the kept sets are not touched.
        """
        T, B, kc = g.shape
        if g_cols is None and x_idx is None:
            out.addmm_(g.reshape(T * B, kc).t(), x.reshape(T * B, -1), alpha=alpha)
            return
        if x_idx is not None:
            x = _take_last(x, x_idx)
        prod = torch.bmm(g.transpose(1, 2), x)  # (T, kc, k)
        K = out.shape[1]
        rows = g_cols if g_cols is not None else torch.arange(out.shape[0], device=g.device).expand(T, -1)
        cols = x_idx if x_idx is not None else torch.arange(K, device=g.device).expand(T, -1)
        # one scatter-add over flat positions (index_add_, not an accumulating index_put_,
        # which sorts on CPU); requires a contiguous ``out``
        flat = (rows[:, :, None] * K + cols[:, None, :]).reshape(-1)
        out.view(-1).index_add_(0, flat, prod.reshape(-1), alpha=alpha)

    # -- fine-grained (block-row sparse) gate gradients ----------------------------------
    def bwd_data_blockrows(
        self,
        vals: Tensor,
        rows: Tensor,
        w: Tensor,
        out_idx: Tensor | None,
        n_rows: int,
        alpha: float = 1.0,
    ) -> Tensor:
        """Backward-data with a fine-grained sparse ``dnet`` (scatter of output rows).

        ``vals``: (S, r, Mx), slice ``s`` holds the kept rows of columns ``[s*Mx, (s+1)*Mx)``
        of ``dnet``; ``rows``: (S, r) their row numbers in ``[0, n_rows)``; ``w``: (N, K)
        with ``N = S * Mx``. Returns (n_rows, k) = ``alpha * sum_s scatter_rows(vals[s] @ w_s[:, out_idx])``.
        """
        S, r, Mx = vals.shape
        ws = w.reshape(S, Mx, -1)
        if out_idx is not None:
            ws = ws[:, :, out_idx]
        part = torch.bmm(vals, ws)  # (S, r, k)
        out = part.new_zeros(n_rows, part.shape[-1])
        out.index_add_(0, rows.reshape(-1), part.reshape(S * r, -1), alpha=alpha)
        return out

    def wgrad_blockrows(
        self,
        vals: Tensor,
        rows: Tensor,
        x: Tensor,
        x_idx: Tensor | None,
        out: Tensor,
        alpha: float = 1.0,
    ) -> None:
        """Weight gradient with a fine-grained sparse ``dnet`` (gather-M), in place.

        ``vals``/``rows`` as in :meth:`bwd_data_blockrows`; ``x``: (n_rows, K);
        ``out``: (S*Mx, K). ``out[s*Mx:(s+1)*Mx][:, x_idx] += alpha * vals[s].T @ x[rows[s]][:, x_idx]``.
        """
        S, r, Mx = vals.shape
        xr = x[rows]  # (S, r, K)
        if x_idx is not None:
            xr = xr[:, :, x_idx]
        prod = torch.bmm(vals.transpose(1, 2), xr)  # (S, Mx, k)
        view = out.view(S, Mx, -1)
        if x_idx is None:
            view.add_(prod, alpha=alpha)
        else:
            view[:, :, x_idx] += prod if alpha == 1.0 else prod * alpha
