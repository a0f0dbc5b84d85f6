"""The sparse LSTM as custom autograd Functions that skip the dropped work.

One :class:`LSTMLayerFunction` call runs one layer in one direction over a whole (padded)
sequence. Per time step ``t`` with ``n_t`` active rows (a ``PackedSequence`` shrinks):

forward (PyTorch gate order i, f, g, o)::

    pre_t  = a_in * x_t[:, I_t] @ W_ih[:, I_t]^T      (all t in one batched GEMM: fwd_input)
           + a_rec * h_{t-1}[:, J_t] @ W_hh[:, J_t]^T  (fwd_recurrent; input sparsity)
           + b_ih + b_hh
    c_t = f * c_{t-1} + i * g ;  h_t = o * tanh(c_t)   (h_t = W_hr (o * tanh(c_t)) with proj_size)

``I_t``/``J_t`` are the kept units of structured dropout (NR on the layer input, RH on
``h_{t-1}`` where it enters the recurrent GEMM), ``a = n / kept`` the inverted scaling.

backward, per step in reverse: ``dnet_t`` (n_t x 4H) from the element-wise LSTM equations,
then gate-gradient sparsity keeps some of it (dense values + offsets), and

* ``dh_{t-1}[:, J_t] = a_rec * dnet_t^kept @ W_hh[kept][:, J_t]`` (bwd_data; output sparsity:
  the dropped units of ``h_{t-1}`` are never computed) — the only GEMM inside the loop;

after the loop, in one batched launch each:

* ``dx_t[:, I_t] = a_in * dnet_t^kept @ W_ih[kept][:, I_t]`` (bwd_data),
* ``dW_ih[kept, I_t] += a_in * dnet_t^kept^T @ x_t[:, I_t]`` and the same for ``W_hh`` with
  ``h_{t-1}`` (wgrad; row sparsity: dropped units' rows are never touched),
* ``db += sum of dnet_t^kept over rows`` at the kept columns.

This per-step composition is one *layer backend* (:class:`~rnn_sparsify.kernels.layer.
ComposedLayerBackend`): :class:`LSTMLayerFunction` hands the whole layer/direction to the
backend chosen by the rule list of :mod:`rnn_sparsify.kernels.layer`; faster backends (the
TVM CPU kernels, :mod:`rnn_sparsify.kernels.cpu_backend`) own the time loop themselves. On the
reference GEMMs this composition is the float64 oracle.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence

from . import gate_selection as gs
from .config import GateGradientSparsity, kept_count
from .input_checks import check_lstm_cell_args, check_lstm_packed, check_lstm_sequence
from .kernels.layer import LayerProblem, as_layer_backend, coarse_params, select_layer_backend


@dataclass
class LayerPlan:
    """Everything one layer/direction call needs besides tensors (masks are drawn before)."""

    in_idx: Optional[Tensor] = None  # (T, k_in) kept input units per step, or None
    in_scale: float = 1.0
    rec_idx: Optional[Tensor] = None  # (T, k_rec) kept units of h_{t-1} per step, or None
    rec_scale: float = 1.0
    batch_sizes: Optional[list[int]] = None  # active rows per step (packed), or None
    reverse: bool = False
    gate_sparsity: Optional[GateGradientSparsity] = None
    backend: object = None
    # filled by backward, for inspection and tests: per processed step, the kept columns
    # (coarse/meprop) or kept row blocks (fine) of dnet.
    selections: dict = field(default_factory=dict)
    record_selections: bool = False


def draw_kept_units(T: int, n: int, p: float, device) -> tuple[Optional[Tensor], float]:
    """Per-step kept unit indices for structured dropout: (T, k) sorted, shared by the batch.

    Exactly ``kept_count(n, p)`` units per step, drawn uniformly without replacement from the
    global torch RNG of ``device``; scale ``n / k``. Returns ``(None, 1.0)`` if nothing drops.
    """
    k = kept_count(n, p)
    if k >= n:
        return None, 1.0
    # the k largest of n uniform keys: a uniform k-subset (topk: O(n), not a full argsort)
    idx = torch.rand(T, n, device=device).topk(k, dim=1, sorted=False).indices
    return torch.sort(idx, dim=1).values, n / k


def composed_forward(be, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan: LayerPlan):
    """Forward of :class:`~rnn_sparsify.kernels.layer.ComposedLayerBackend`: the per-step
    composition of indexed GEMMs on the GEMM backend ``be`` (the reference oracle)."""
    T, B, _ = x.shape
    H = w_ih.shape[0] // 4
    Hout = w_hh.shape[1]
    bs = plan.batch_sizes
    pre_x = be.fwd_input(x, w_ih, plan.in_idx, plan.in_scale)
    if b_ih is not None:
        pre_x += b_ih + b_hh
    h = h0.clone()
    c = c0.clone()
    gates = x.new_zeros(T, B, 4 * H)
    c_all = x.new_zeros(T, B, H)
    cprev_all = x.new_zeros(T, B, H)
    hprev_all = x.new_zeros(T, B, Hout)
    m_all = x.new_zeros(T, B, H) if w_hr is not None else None
    y = x.new_zeros(T, B, Hout)
    steps = range(T - 1, -1, -1) if plan.reverse else range(T)
    for t in steps:
        n = bs[t] if bs is not None else B
        hp = h[:n]
        hprev_all[t, :n] = hp
        rec = None if plan.rec_idx is None else plan.rec_idx[t]
        pre = pre_x[t, :n] + be.fwd_recurrent(hp, w_hh, rec, plan.rec_scale)
        i, f, g, o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        cp = c[:n]
        cprev_all[t, :n] = cp
        cn = f * cp + i * g
        m = o * torch.tanh(cn)
        if w_hr is not None:
            m_all[t, :n] = m
            hn = m @ w_hr.t()
        else:
            hn = m
        gates[t, :n] = torch.cat([i, f, g, o], dim=1)
        c_all[t, :n] = cn
        c[:n] = cn
        h[:n] = hn
        y[t, :n] = hn
    saved = (x, w_ih, w_hh, w_hr, gates, c_all, cprev_all, hprev_all, m_all)
    return y, h, c, saved, b_ih is not None


def composed_backward(be, saved, has_bias, plan: LayerPlan, dy, dhn, dcn, need):
    """Backward of :class:`~rnn_sparsify.kernels.layer.ComposedLayerBackend`."""
    x, w_ih, w_hh, w_hr, gates, c_all, cprev_all, hprev_all, m_all = saved
    T, B, I = x.shape
    H = w_ih.shape[0] // 4
    C = 4 * H
    bs = plan.batch_sizes
    cfg = plan.gate_sparsity
    fine = cfg is not None and cfg.mode == "fine"
    colwise = cfg is not None and not fine
    blk = cfg.P if (cfg is not None and cfg.mode == "coarse") else 1
    n0 = bs[0] if bs is not None else B
    if fine:
        gs.check_fine_batch(cfg, n0)

    dh = dhn.clone()
    dc = dcn.clone()
    kc = gs.kept_column_count(C, cfg) if colwise else C
    G = None if fine else x.new_zeros(T, B, kc)
    cols_all = x.new_zeros(T, kc, dtype=torch.long) if colwise else None
    fine_steps: list = []  # (t, n, vals, rows) for fine mode
    dr_all = x.new_zeros(T, B, w_hr.shape[0]) if w_hr is not None else None

    steps = range(T) if plan.reverse else range(T - 1, -1, -1)
    for t in steps:
        n = bs[t] if bs is not None else B
        dh_t = dh[:n] + dy[t, :n]
        if w_hr is not None:
            dr_all[t, :n] = dh_t
            dm = dh_t @ w_hr
        else:
            dm = dh_t
        i, f, g, o = gates[t, :n].chunk(4, dim=1)
        tc = torch.tanh(c_all[t, :n])
        dct = dc[:n] + dm * o * (1 - tc * tc)
        dnet = torch.cat(
            [
                dct * g * i * (1 - i),
                dct * cprev_all[t, :n] * f * (1 - f),
                dct * i * (1 - g * g),
                dm * tc * o * (1 - o),
            ],
            dim=1,
        )
        dc[:n] = dct * f
        rec = None if plan.rec_idx is None else plan.rec_idx[t]
        if cfg is None:
            G[t, :n] = dnet
            dprev = be.bwd_data(dnet, None, w_hh, rec, plan.rec_scale)
        elif colwise:
            cols = gs.kept_columns(dnet, cfg)
            vals = dnet[:, cols]
            G[t, :n] = vals
            cols_all[t] = cols
            dprev = be.bwd_data(vals, cols, w_hh, rec, plan.rec_scale, block=blk)
            if plan.record_selections:
                plan.selections[t] = cols
        else:
            blocks = gs.fine_kept_blocks(dnet, cfg.My, cfg.Mx, gs.fine_drop_count(cfg.K, n, n0))
            vals, rows = gs.fine_pack(dnet, blocks, cfg.My, cfg.Mx)
            npad = -(-n // cfg.My) * cfg.My
            dprev = be.bwd_data_blockrows(vals, rows, w_hh, rec, npad, plan.rec_scale)[:n]
            fine_steps.append((t, n, vals, rows))
            if plan.record_selections:
                plan.selections[t] = blocks
        if rec is None:
            dh[:n] = dprev
        else:
            dh[:n] = 0
            dh[:n, rec] = dprev

    dx = dw_ih = dw_hh = db = dw_hr = None
    if need[3]:
        dw_ih = torch.zeros_like(w_ih, memory_format=torch.contiguous_format)  # the GEMMs write in place
    if need[4]:
        dw_hh = torch.zeros_like(w_hh, memory_format=torch.contiguous_format)
    if has_bias and (need[5] or need[6]):
        db = x.new_zeros(C)
    if need[0] and (fine or plan.in_idx is not None):
        dx = x.new_zeros(T, B, I)  # written only at kept units / rows (else the GEMM fills it)

    if not fine:
        if need[0]:
            vals = be.bwd_data(G, cols_all, w_ih, plan.in_idx, plan.in_scale, block=blk)
            if plan.in_idx is None:
                dx = vals
            else:
                dx.scatter_(2, plan.in_idx[:, None, :].expand(T, B, plan.in_idx.shape[1]), vals)
        if dw_ih is not None:
            be.wgrad(G, cols_all, x, plan.in_idx, dw_ih, plan.in_scale, block=blk)
        if dw_hh is not None:
            be.wgrad(G, cols_all, hprev_all, plan.rec_idx, dw_hh, plan.rec_scale, block=blk)
        if db is not None:
            if cols_all is None:
                db = G.sum(dim=(0, 1))
            else:
                db.index_add_(0, cols_all.reshape(-1), G.sum(dim=1).reshape(-1))
    else:
        My = cfg.My
        for t, n, vals, rows in fine_steps:
            npad = -(-n // My) * My
            in_t = None if plan.in_idx is None else plan.in_idx[t]
            if need[0]:
                d = be.bwd_data_blockrows(vals, rows, w_ih, in_t, npad, plan.in_scale)[:n]
                if in_t is None:
                    dx[t, :n] = d
                else:
                    dx[t, :n, in_t] = d
            pad = npad - n
            if dw_ih is not None:
                xt = F.pad(x[t, :n], (0, 0, 0, pad))
                be.wgrad_blockrows(vals, rows, xt, in_t, dw_ih, plan.in_scale)
            if dw_hh is not None:
                ht = F.pad(hprev_all[t, :n], (0, 0, 0, pad))
                rec = None if plan.rec_idx is None else plan.rec_idx[t]
                be.wgrad_blockrows(vals, rows, ht, rec, dw_hh, plan.rec_scale)
            if db is not None:
                db += vals.sum(dim=1).reshape(-1)

    if w_hr is not None and need[7]:
        Hp = w_hr.shape[0]
        dw_hr = dr_all.reshape(T * B, Hp).t() @ m_all.reshape(T * B, H)
    db_ih = db if (db is not None and need[5]) else None
    db_hh = db.clone() if (db is not None and need[6]) else None
    return dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr


class LSTMLayerFunction(torch.autograd.Function):
    """One LSTM layer, one direction, a whole padded sequence ``x`` of shape (T, B, I), on the
    layer backend ``plan.backend`` (a GEMM backend is run as the per-step composition)."""

    # forward / setup_context split (torch.func.grad / functional_call work in training);
    # the backend's saved state travels from forward to setup_context on the plan.
    @staticmethod
    def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan: LayerPlan):
        be = as_layer_backend(plan.backend)
        y, h, c, saved, meta = be.forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan)
        plan._handoff = (be, saved, meta)
        return y, h, c

    @staticmethod
    def setup_context(ctx, inputs, output):
        plan = inputs[-1]
        be, saved, meta = plan._handoff  # kept: torch.func may set up more than one context
        ctx.plan = plan
        ctx.layer_backend = be
        ctx.meta = meta
        ctx.save_for_backward(*saved)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dhn, dcn):
        ctx.plan._handoff = None
        grads = ctx.layer_backend.backward(
            ctx.saved_tensors, ctx.meta, ctx.plan, dy, dhn, dcn, ctx.needs_input_grad
        )
        return (*grads, None)


# --------------------------------------------------------------------------------------
# nn.LSTM / nn.LSTMCell front ends


def _layer_params(mod, layer: int, direction: int):
    sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
    w_ih = getattr(mod, "weight_ih" + sfx)
    w_hh = getattr(mod, "weight_hh" + sfx)
    b_ih = getattr(mod, "bias_ih" + sfx) if mod.bias else None
    b_hh = getattr(mod, "bias_hh" + sfx) if mod.bias else None
    w_hr = getattr(mod, "weight_hr" + sfx) if mod.proj_size > 0 else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def _pad_packed(data: Tensor, batch_sizes: list[int]) -> tuple[Tensor, Tensor]:
    """Packed (sum n_t, F) data -> padded (T, B, F), zeros at inactive positions; plus the
    boolean (T, B) activity mask (packed order is time-major, active rows first)."""
    T, B = len(batch_sizes), batch_sizes[0]
    bs = torch.tensor(batch_sizes, device=data.device)
    active = torch.arange(B, device=data.device)[None, :] < bs[:, None]
    out = data.new_zeros(T, B, data.shape[-1])
    out[active] = data
    return out, active


def _in_func_transform() -> bool:
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover - older torch
        return False


def _layer_backend_for(mod, x: Tensor, **problem):
    """The layer backend for one layer/direction call (first applicable rule, see
    :mod:`rnn_sparsify.kernels.layer`). Records ``mod.last_backend`` (name) and
    ``mod.last_backend_reasons`` (every rule's verdict); warns once per module when a CUDA
    tensor runs on the reference kernels (gathers + cuBLAS: slower than cuDNN's dense LSTM)."""
    prob = LayerProblem(device=x.device, dtype=x.dtype, func_transform=_in_func_transform(), **problem)
    backend, verdicts = select_layer_backend(prob)
    mod.last_backend = backend.name
    mod.last_backend_reasons = verdicts
    if x.is_cuda and backend.name == "reference" and not getattr(mod, "_warned_reference", False):
        mod._warned_reference = True
        warnings.warn(
            f"{type(mod).__name__}: no generated kernels for {x.dtype} on {x.device}; the sparse "
            "training path runs on the PyTorch reference kernels, which are slower than cuDNN's "
            "dense LSTM. Build a kernel bundle with `rnn-sparsify compile` (docs/codegen.md).",
            RuntimeWarning,
            stacklevel=4,
        )
    return backend


def _cpu_autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The CPU autocast dtype in force for ``x``, or None (torch >= 2.1 spellings)."""
    if x.device.type != "cpu":
        return None
    try:
        enabled = torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_cpu_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype("cpu")
    except (AttributeError, TypeError):  # torch < 2.4
        return torch.get_autocast_cpu_dtype()


def _cast(v, dtype):
    if v is None:
        return None
    if isinstance(v, PackedSequence):
        return v._replace(data=v.data.to(dtype)) if v.data.is_floating_point() else v
    if isinstance(v, (tuple, list)):
        return type(v)(_cast(t, dtype) for t in v)
    return v.to(dtype) if v.is_floating_point() else v


def _autocast_wrapped(impl):
    """Under CPU autocast, ``nn.LSTM`` computes in (and returns) the autocast dtype. The sparse
    path computes in the parameters' dtype (float32: the CPU kernels are float32, and no
    precision is lost) with autocast off, and returns the autocast dtype like ``nn.LSTM``."""

    def run(mod, input, hx=None):
        data = input.data if isinstance(input, PackedSequence) else input
        ac = _cpu_autocast_dtype(data) if isinstance(data, Tensor) else None
        if ac is None:
            return impl(mod, input, hx)
        wdt = next(mod.parameters()).dtype
        with torch.autocast("cpu", enabled=False):
            out = impl(mod, _cast(input, wdt), _cast(hx, wdt))
        return _cast(out, ac)

    run.__name__ = impl.__name__
    run.__doc__ = impl.__doc__
    return run


@_autocast_wrapped
def sparse_lstm_forward(mod, input, hx=None):
    """``nn.LSTM.forward`` semantics on the sparse layer Functions (training path)."""
    is_packed = isinstance(input, PackedSequence)
    sorted_indices = unsorted_indices = None
    batch_sizes = None
    if is_packed:
        check_lstm_packed(mod, input, hx)  # nn.LSTM's own errors and messages
        data, bs_t, sorted_indices, unsorted_indices = input
        batch_sizes = [int(b) for b in bs_t]
        if hx is not None:
            mod.check_forward_args(data, mod.permute_hidden(hx, sorted_indices), bs_t)
        else:
            mod.check_input(data, bs_t)
        x, active = _pad_packed(data, batch_sizes)
        unbatched = False
    else:
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        unbatched = input.dim() == 2
        x = input.unsqueeze(0 if mod.batch_first else 1) if unbatched else input
        if hx is not None:
            if unbatched:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            elif hx[0].dim() != 3 or hx[1].dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx and cx should also be 3-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
        if hx is not None:
            mod.check_forward_args(x, hx, None)
        else:
            mod.check_input(x, None)
        if mod.batch_first:
            x = x.transpose(0, 1)

    check_lstm_sequence(x)  # nn.LSTM's own error for an empty sequence
    T, B = x.shape[0], x.shape[1]
    D = 2 if mod.bidirectional else 1
    Hout = mod.proj_size if mod.proj_size > 0 else mod.hidden_size
    if hx is None:
        h0 = x.new_zeros(mod.num_layers * D, B, Hout)
        c0 = x.new_zeros(mod.num_layers * D, B, mod.hidden_size)
    else:
        h0, c0 = hx
        if is_packed:
            h0, c0 = mod.permute_hidden((h0, c0), sorted_indices)

    sd = mod.structured_dropout
    gate_cfg = mod.active_gate_sparsity
    record = getattr(mod, "record_plans", False)
    plans = []
    layer_input = x
    hn, cn = [], []
    for layer in range(mod.num_layers):
        in_idx, in_scale = None, 1.0
        if sd is not None and sd.p_input > 0:
            in_idx, in_scale = draw_kept_units(T, layer_input.shape[-1], sd.p_input, x.device)
        elif layer > 0 and mod.dropout > 0 and is_packed:  # on the packed rows, as _VF.lstm draws it
            layer_input = layer_input.new_zeros(layer_input.shape).index_put(
                (active,), F.dropout(layer_input[active], mod.dropout, training=True))
        elif layer > 0 and mod.dropout > 0:
            layer_input = F.dropout(layer_input, mod.dropout, training=True)
        outs = []
        for d in range(D):
            rec_idx, rec_scale = None, 1.0
            if sd is not None and sd.p_recurrent > 0:
                rec_idx, rec_scale = draw_kept_units(T, Hout, sd.p_recurrent, x.device)
            backend = _layer_backend_for(
                mod,
                layer_input,
                input_size=layer_input.shape[-1],
                hidden_size=mod.hidden_size,
                proj_size=mod.proj_size,
                batch=B,
                seq_len=T,
                packed=batch_sizes is not None,
                reverse=d == 1,
                in_keep=None if in_idx is None else in_idx.shape[1],
                rec_keep=None if rec_idx is None else rec_idx.shape[1],
                gate_mode=None if gate_cfg is None else gate_cfg.mode,
                gate_coarse=coarse_params(gate_cfg),
            )
            plan = LayerPlan(
                in_idx=in_idx,
                in_scale=in_scale,
                rec_idx=rec_idx,
                rec_scale=rec_scale,
                batch_sizes=batch_sizes,
                reverse=d == 1,
                gate_sparsity=gate_cfg,
                backend=backend,
                record_selections=record,
            )
            plans.append(plan)
            k = layer * D + d
            y, h, c = LSTMLayerFunction.apply(layer_input, h0[k], c0[k], *_layer_params(mod, layer, d), plan)
            outs.append(y)
            hn.append(h)
            cn.append(c)
        layer_input = outs[0] if D == 1 else torch.cat(outs, dim=-1)
    if record:
        mod.last_plans = plans
    h_n = torch.stack(hn)
    c_n = torch.stack(cn)
    if is_packed:
        out = PackedSequence(layer_input[active], bs_t, sorted_indices, unsorted_indices)
        return out, mod.permute_hidden((h_n, c_n), unsorted_indices)
    out = layer_input.transpose(0, 1) if mod.batch_first else layer_input
    if unbatched:
        return out.squeeze(0 if mod.batch_first else 1), (h_n.squeeze(1), c_n.squeeze(1))
    return out, (h_n, c_n)


@_autocast_wrapped
def sparse_lstm_cell_forward(mod, input: Tensor, hx=None):
    """``nn.LSTMCell.forward`` semantics: one step of the layer Function (T = 1)."""
    check_lstm_cell_args(mod, input, hx)  # nn.LSTMCell's own errors and messages
    if input.dim() not in (1, 2):
        raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
    if hx is not None and (hx[0].dim() not in (1, 2) or hx[1].dim() not in (1, 2)):
        raise ValueError(
            f"LSTMCell: Expected hx[0] to be 1D or 2D, got {hx[0].dim()}D instead"
        )
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    if x.shape[1] != mod.input_size:
        raise RuntimeError(
            f"input has inconsistent input_size: got {x.shape[1]} expected {mod.input_size}"
        )
    if hx is None:
        h0 = x.new_zeros(x.shape[0], mod.hidden_size)
        c0 = x.new_zeros(x.shape[0], mod.hidden_size)
    else:
        h0, c0 = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if unbatched else hx
    sd = mod.structured_dropout
    in_idx, in_scale, rec_idx, rec_scale = None, 1.0, None, 1.0
    if sd is not None and sd.p_input > 0:
        in_idx, in_scale = draw_kept_units(1, mod.input_size, sd.p_input, x.device)
    if sd is not None and sd.p_recurrent > 0:
        rec_idx, rec_scale = draw_kept_units(1, mod.hidden_size, sd.p_recurrent, x.device)
    gate_cfg = mod.active_gate_sparsity
    backend = _layer_backend_for(
        mod,
        x,
        input_size=mod.input_size,
        hidden_size=mod.hidden_size,
        batch=x.shape[0],
        seq_len=1,
        in_keep=None if in_idx is None else in_idx.shape[1],
        rec_keep=None if rec_idx is None else rec_idx.shape[1],
        gate_mode=None if gate_cfg is None else gate_cfg.mode,
        gate_coarse=coarse_params(gate_cfg),
    )
    plan = LayerPlan(
        in_idx=in_idx,
        in_scale=in_scale,
        rec_idx=rec_idx,
        rec_scale=rec_scale,
        gate_sparsity=gate_cfg,
        backend=backend,
        record_selections=getattr(mod, "record_plans", False),
    )
    if plan.record_selections:
        mod.last_plans = [plan]
    b_ih = mod.bias_ih if mod.bias else None
    b_hh = mod.bias_hh if mod.bias else None
    _, h, c = LSTMLayerFunction.apply(x.unsqueeze(0), h0, c0, mod.weight_ih, mod.weight_hh, b_ih, b_hh, None, plan)
    if unbatched:
        return h.squeeze(0), c.squeeze(0)
    return h, c
