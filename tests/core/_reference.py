"""A plain autograd LSTM in float64: the dense reference the sparse Functions are tested against.

Structured dropout is applied as explicit masks (multiplication: the *definition*), and
gate-gradient sparsity as a gradient hook on each step's gate pre-activation that zeroes
exactly what the selection rule drops. No code is shared with ``lstm_function``.
"""
from __future__ import annotations

import torch

from rnn_sparsify import gate_selection as gs


def unit_mask(idx, n, T, dtype):
    """(T, n) float mask with 1 at kept units; all ones if idx is None."""
    m = torch.ones(T, n, dtype=dtype)
    if idx is not None:
        m.zero_()
        m.scatter_(1, idx.cpu(), 1.0)
    return m


def ref_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan, batch_sizes=None, gate_cfg=None, reverse=False):
    """x (T, B, I), returns y (T, B, Hout), h_T, c_T, dense autograd."""
    T, B, I = x.shape
    Hout = w_hh.shape[1]
    m_in = unit_mask(plan.in_idx, I, T, x.dtype) * plan.in_scale
    m_rec = unit_mask(plan.rec_idx, Hout, T, x.dtype) * plan.rec_scale
    h, c = h0, c0
    ys = [None] * T
    n0 = batch_sizes[0] if batch_sizes else B
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        n = batch_sizes[t] if batch_sizes else B
        xt = x[t, :n] * m_in[t]
        hp = h[:n] * m_rec[t]
        pre = xt @ w_ih.t() + hp @ w_hh.t()
        if b_ih is not None:
            pre = pre + b_ih + b_hh
        if gate_cfg is not None and pre.requires_grad:
            def hook(grad, n=n):
                keep = gs.dense_mask(tuple(grad.shape), gate_cfg, grad, n0)
                return grad * keep
            pre.register_hook(hook)
        i, f, g, o = pre.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        cn = f * c[:n] + i * g
        hn = o * cn.tanh()
        if w_hr is not None:
            hn = hn @ w_hr.t()
        ys[t] = torch.cat([hn, x.new_zeros(B - n, Hout)]) if n < B else hn
        h = torch.cat([hn, h[n:]]) if n < B else hn
        c = torch.cat([cn, c[n:]]) if n < B else cn
    return torch.stack(ys), h, c


def ref_lstm(mod, x, h0, c0, plans, batch_sizes=None, gate_cfg=None):
    """Whole multi-layer (bi)LSTM in the padded, time-major layout, using recorded plans."""
    D = 2 if mod.bidirectional else 1
    inp = x
    hs, cs = [], []
    for layer in range(mod.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            k = layer * D + d
            y, h, c = ref_layer(
                inp, h0[k], c0[k],
                getattr(mod, "weight_ih" + sfx), getattr(mod, "weight_hh" + sfx),
                getattr(mod, "bias_ih" + sfx) if mod.bias else None,
                getattr(mod, "bias_hh" + sfx) if mod.bias else None,
                getattr(mod, "weight_hr" + sfx) if mod.proj_size else None,
                plans[k], batch_sizes, gate_cfg, reverse=bool(d),
            )
            outs.append(y)
            hs.append(h)
            cs.append(c)
        inp = torch.cat(outs, -1) if D == 2 else outs[0]
    return inp, torch.stack(hs), torch.stack(cs)
