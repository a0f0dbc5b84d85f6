"""The fast CPU layer backend: TVM-generated kernels that own the time loop.

One layer/direction call runs ``pack -> in_proj -> fwd_loop`` forward and ``bwd_loop ->
wgrad (W_ih) -> wgrad (W_hh) -> dx`` backward (kernels in :mod:`rnn_sparsify.codegen.cpu_lstm`,
loaded by :mod:`.cpu_runtime`), no Python per time step. With gate-gradient sparsity the
backward runs ``bwd_elem``, the selection (the rules of :mod:`rnn_sparsify.gate_selection`,
on the step's gate gradient) and ``bwd_dh`` per step; the dropped entries are zeroed, so every
later GEMM computes exactly the sparse math (zeros contribute nothing).

The module keeps ``nn.LSTM``'s parameters; the kernels' layout (``W^T`` with gate columns
interleaved by 16-unit blocks and a zero dummy row) is built from them at each forward (a generated
kernel, 0.5-1 ms per 650 x 2600 matrix), and gradients are converted back. Nothing
of the layout is visible outside this file.

Applies to: CPU, float32, no projection, padded (not packed) batches; anything else falls to
the next rule (see :func:`cpu_rule`). ``RNN_SPARSIFY_CPU_KERNELS=0`` switches it off.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import gate_selection as gs
from .layer import LayerBackend, LayerProblem, coarse_params

U = 16
_COLS: dict[int, Tensor] = {}


def gate_cols(H: int) -> Tensor:
    """``cols[g*H + j]`` = column of gate ``g`` of unit ``j`` in the interleaved layout."""
    c = _COLS.get(H)
    if c is None:
        j = torch.arange(H)
        c = torch.cat([(j // U) * 4 * U + g * U + j % U for g in range(4)])
        _COLS[H] = c
    return c


def to_wt(w: Tensor, n: int, Hp: int) -> Tensor:
    """``nn.LSTM`` weight (4H, n) -> ``W^T`` (n + 1, 4*Hp) interleaved, zero padding + dummy row.

    A blocked 2-D transpose, then a permutation of 16-float runs ``(n, 4, Hp/U, U) ->
    (n, Hp/U, 4, U)`` (the same map as :func:`gate_cols`).
    """
    H = w.shape[0] // 4
    nub = Hp // U
    wt = w.detach().t().contiguous().view(n, 4, H)
    if H != Hp:
        padded = w.new_zeros(n, 4, Hp)
        padded[:, :, :H] = wt
        wt = padded
    out = w.new_empty(n + 1, nub, 4, U)
    out[:n].copy_(wt.view(n, 4, nub, U).permute(0, 2, 1, 3))
    out[n].zero_()
    return out.view(n + 1, 4 * Hp)


def from_wt(wt: Tensor, n: int, H: int) -> Tensor:
    """Inverse of :func:`to_wt` for a gradient: (n + 1, 4*Hp) -> (4H, n)."""
    Hp = wt.shape[1] // 4
    v = wt[:n].view(n, Hp // U, 4, U).permute(0, 2, 1, 3).reshape(n, 4, Hp)
    return v[:, :, :H].reshape(n, 4 * H).t().contiguous()


def _kept_padded(idx: Optional[Tensor], T: int, n: int, K: int) -> Tensor:
    """(T, K) int32 kept units padded with the dummy index ``n`` (all units if ``idx`` is None)."""
    out = torch.full((T, K), n, dtype=torch.int32)
    if idx is None:
        out[:, :n] = torch.arange(n, dtype=torch.int32)
    else:
        out[:, : idx.shape[1]] = idx.to(torch.int32)
    return out


def _packed(w: Tensor, n: int, Hp: int, kernel) -> Tensor:
    """``W^T`` of ``w`` for this call, by the generated ``to_wt`` kernel (the map of
    :func:`to_wt`). Rebuilt at every forward (0.5-1 ms for a 650 x 2600 matrix): a cache keyed
    on the version counter would miss ``.data`` writes, and one keyed on ``id``/``data_ptr``
    would hand a new tensor at a reused address the old values."""
    wt = w.new_empty(n + 1, 4 * Hp)
    kernel(w.detach().contiguous(), wt)
    return wt


class TvmCpuLayerBackend(LayerBackend):
    """Generated CPU kernels for one layer/direction (see the module docstring)."""

    name = "tvm_cpu"

    def __init__(self, isa: str):
        self.isa = isa

    # -- helpers ---------------------------------------------------------------------
    def spec_for(self, input_size: int, hidden_size: int, batch: int, k_in: int, k_rec: int,
                 coarse: tuple = ()):
        from ..codegen.cpu_lstm import CpuLayerSpec, pad_batch, pad_kept

        _, Bp = pad_batch(batch, self.isa)
        return CpuLayerSpec(
            input_size=input_size,
            hidden_size=hidden_size,
            batch=Bp,
            k_in=pad_kept(k_in, self.isa),
            k_rec=pad_kept(k_rec, self.isa),
            isa=self.isa,
            mcpu="",
            coarse=tuple(coarse),
        )

    @staticmethod
    def _threads():
        from .cpu_runtime import set_num_threads

        set_num_threads(torch.get_num_threads())

    # -- forward -----------------------------------------------------------------------
    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan):
        from .cpu_runtime import load_layer

        if plan.gate_sparsity is not None and plan.in_idx is None and plan.rec_idx is None:
            _warn_once(
                "gate-gradient sparsity without structured dropout: on the CPU kernels the dropped "
                "gate-gradient entries are zeroed, not skipped, so this training step is slower than "
                "nn.LSTM's (measured 0.57-0.87x of its speed, docs/benchmarks.md); the gradients are "
                "exactly the sparse ones"
            )

        T, B, I = x.shape
        H = w_hh.shape[1]
        k_in = I if plan.in_idx is None else plan.in_idx.shape[1]
        k_rec = H if plan.rec_idx is None else plan.rec_idx.shape[1]
        spec = self.spec_for(I, H, B, k_in, k_rec, coarse_params(plan.gate_sparsity))
        lib = load_layer(spec)
        self._threads()
        Bp, Hp, G = spec.batch, spec.Hp, spec.G
        RT = min(spec.tiles.RT, Bp)
        rev = plan.reverse
        in_idx = plan.in_idx.flip(0) if (rev and plan.in_idx is not None) else plan.in_idx
        rec_idx = plan.rec_idx.flip(0) if (rev and plan.rec_idx is not None) else plan.rec_idx
        idx_in = _kept_padded(in_idx, T, I, spec.k_in)
        idx_rec = _kept_padded(rec_idx, T, H, spec.k_rec)
        a_in, a_rec = float(plan.in_scale), float(plan.rec_scale)

        xs = x.detach().flip(0) if rev else x.detach()
        if Bp != B or not xs.is_contiguous():
            X = x.new_zeros(T, Bp, I)
            X[:, :B] = xs
        else:
            X = xs
        WiT = _packed(w_ih, I, Hp, lib["to_wt_in"])
        WhT = _packed(w_hh, H, Hp, lib["to_wt_rec"])
        bias = x.new_zeros(G)
        if b_ih is not None:
            bias[gate_cols(H)] = (b_ih + b_hh).detach()

        Pk = x.new_empty(T, Bp // RT, spec.k_in, RT)
        lib["pack_in"](X, idx_in, a_in, Pk)
        Gt = x.new_empty(T, Bp, G)
        lib["in_proj"](Pk, idx_in, WiT, bias, Gt)
        Hs = x.new_zeros(T + 1, Bp, Hp)
        Cs = x.new_zeros(T + 1, Bp, Hp)
        Hs[0, :B, :H] = h0.detach()
        Cs[0, :B, :H] = c0.detach()
        inv = torch.full((T, Hp), -1, dtype=torch.int32)
        real = idx_rec < H
        tt = torch.arange(T)[:, None].expand_as(idx_rec)
        pos = torch.arange(spec.k_rec, dtype=torch.int32)[None, :].expand_as(idx_rec)
        inv[tt[real], idx_rec[real].long()] = pos[real]
        Ak = x.new_zeros(T, Bp // RT, spec.k_rec, RT)
        # step 0's packed recurrent input a * h0[:, J_0] (later steps: packed by fwd_loop)
        j0 = idx_rec[0].long()
        h0k = torch.cat([Hs[0, :, :H], Hs.new_zeros(Bp, 1)], dim=1).index_select(1, j0) * a_rec
        Ak[0] = h0k.reshape(Bp // RT, RT, spec.k_rec).transpose(1, 2)
        lib["fwd_loop"](Gt, idx_rec, inv, WhT, a_rec, Hs, Cs, Ak)

        y = Hs[1:, :B, :H]
        y = y.flip(0).contiguous() if rev else y.contiguous()
        h_T = Hs[T, :B, :H].clone()
        c_T = Cs[T, :B, :H].clone()
        saved = (Gt, Hs, Cs, Pk, Ak, WiT, WhT, idx_in, idx_rec)
        meta = {"spec": spec, "lib": lib, "B": B, "a_in": a_in, "a_rec": a_rec,
                "has_bias": b_ih is not None, "T": T}
        return y, h_T, c_T, saved, meta

    # -- backward ----------------------------------------------------------------------
    def backward(self, saved, meta, plan, dy, dhn, dcn, need):
        Gt, Hs, Cs, Pk, Ak, WiT, WhT, idx_in, idx_rec = saved
        spec, lib, B, T = meta["spec"], meta["lib"], meta["B"], meta["T"]
        self._threads()
        I, H = spec.input_size, spec.hidden_size
        Bp, Hp, G = spec.batch, spec.Hp, spec.G
        rev = plan.reverse
        dY = Gt.new_zeros(T, Bp, Hp)
        dY[:, :B, :H] = dy.flip(0) if rev else dy
        DH = Gt.new_zeros(Bp, Hp)
        DC = Gt.new_zeros(Bp, Hp)
        DH[:B, :H] = dhn
        DC[:B, :H] = dcn
        dNet = Gt.new_empty(T, Bp, G)
        cfg = plan.gate_sparsity
        a_in, a_rec = meta["a_in"], meta["a_rec"]
        no_kept = _NO_KEPT.get(T)
        if no_kept is None:
            no_kept = _NO_KEPT[T] = torch.ones(T, 1, dtype=torch.int8)
        if cfg is None:
            lib["bwd_loop"](dY, Gt, Cs, idx_rec, WhT, a_rec, 0, T, DH, DC, dNet, no_kept)
        elif cfg.mode == "coarse" and meta["spec"].coarse:
            # the selection runs inside the kernel between the two halves of every step
            kept = torch.empty(T, 4 * H // cfg.P, dtype=torch.int8)
            lib["bwd_coarse"](dY, Gt, Cs, idx_rec, WhT, a_rec, 0, T, DH, DC, dNet, kept)
            if plan.record_selections:
                cols = torch.arange(cfg.P)
                for t in range(T):
                    sel = kept[t].nonzero().flatten()
                    plan.selections[T - 1 - t if rev else t] = (sel[:, None] * cfg.P + cols).reshape(-1)
        else:
            if cfg.mode == "fine":
                gs.check_fine_batch(cfg, B)
            cols = gate_cols(H)
            scratch = Gt.new_empty(B, G)  # reused every step (a fresh 4H x B buffer page-faults)
            for t in range(T - 1, -1, -1):
                lib["bwd_elem"](dY, Gt, Cs, idx_rec, WhT, a_rec, t, t + 1, DH, DC, dNet, no_kept)
                self._select(dNet[t], B, H, cols, cfg, plan, T - 1 - t if rev else t, scratch)
                lib["bwd_dh"](dY, Gt, Cs, idx_rec, WhT, a_rec, t, t + 1, DH, DC, dNet, no_kept)

        dx = dw_ih = dw_hh = db_ih = db_hh = None
        if need[0]:
            dX = Gt.new_empty(T, Bp, I)
            lib["dx"](dNet, idx_in, WiT, a_in, dX)
            dx = dX[:, :B]
            dx = dx.flip(0).contiguous() if rev else dx.contiguous()
        if need[3]:
            dw_ih = Gt.new_empty(4 * H, I)
            lib["wgrad_in"](Pk, idx_in, dNet, Gt.new_empty(I + 1, G), dw_ih)  # scratch dW^T
        if need[4]:
            dw_hh = Gt.new_empty(4 * H, H)
            lib["wgrad_rec"](Ak, idx_rec, dNet, Gt.new_empty(H + 1, G), dw_hh)
        if meta["has_bias"] and (need[5] or need[6]):
            db = dNet[:, :B].sum(dim=(0, 1)).index_select(0, gate_cols(H))
            db_ih = db if need[5] else None
            db_hh = db.clone() if need[6] else None
        dh0 = DH[:B, :H].clone() if need[1] else None
        dc0 = DC[:B, :H].clone() if need[2] else None
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None

    @staticmethod
    def _select(dnet_t: Tensor, B: int, H: int, cols: Tensor, cfg, plan, t_actual: int, scratch=None) -> None:
        """Zero what gate-gradient sparsity drops from one step's ``dNet`` (interleaved)."""
        if cfg.mode == "coarse" and U % cfg.P == 0 and H % cfg.P == 0:
            # a slice of P units of one gate is P contiguous interleaved columns: score and
            # drop in place, without the gate-order copy
            starts = cols[:: cfg.P]  # interleaved column of each slice's first unit
            d = dnet_t[:B]
            sq = (torch.mul(d, d, out=scratch) if scratch is not None else d * d).sum(0)
            scores = _slice_sums(sq, starts, cfg.P)
            sel = gs.coarse_kept_slices_from_scores(scores, cfg.R, cfg.S)
            keep = torch.zeros(dnet_t.shape[1], dtype=torch.bool)
            keep[(starts[sel][:, None] + torch.arange(cfg.P)).reshape(-1)] = True
            dnet_t.masked_fill_(~keep, 0.0)
            if plan.record_selections:
                plan.selections[t_actual] = (sel[:, None] * cfg.P + torch.arange(cfg.P)).reshape(-1)
            return
        d = dnet_t[:B].index_select(1, cols)  # (B, 4H) in PyTorch gate order
        keep = torch.zeros(dnet_t.shape[1], dtype=torch.bool)
        if cfg.mode == "fine":
            blocks = gs.fine_kept_blocks(d, cfg.My, cfg.Mx, gs.fine_drop_count(cfg.K, B, B))
            S = d.shape[1] // cfg.Mx
            nb = -(-B // cfg.My)
            kb = torch.zeros(S, nb, dtype=torch.bool)
            kb.scatter_(1, blocks, True)
            m = kb.t().repeat_interleave(cfg.My, 0)[:B].repeat_interleave(cfg.Mx, 1)  # (B, 4H)
            mask = torch.zeros(B, dnet_t.shape[1], dtype=dnet_t.dtype)
            mask[:, cols] = m.to(dnet_t.dtype)
            dnet_t[:B].mul_(mask)
            sel = blocks
        else:
            sel = gs.kept_columns(d, cfg)
            keep[cols[sel]] = True
            dnet_t.masked_fill_(~keep, 0.0)
        if plan.record_selections:
            plan.selections[t_actual] = sel


def _slice_sums(sq: Tensor, starts: Tensor, P: int) -> Tensor:
    """``sum(sq[starts[s] : starts[s] + P])`` for every slice ``s``."""
    return sq.index_select(0, (starts[:, None] + torch.arange(P)).reshape(-1)).view(-1, P).sum(1)


# --------------------------------------------------------------------------------------
# the rule

_BACKENDS: dict[str, TvmCpuLayerBackend] = {}
_NO_KEPT: dict[int, Tensor] = {}  # T -> the (T, 1) dummy ``kept`` of the non-coarse bwd kernels
_FAILED: dict = {}  # spec -> why its kernels are unavailable (never retried)
_WARNED: set = set()


def _warn_once(msg: str, stacklevel: int = 4) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"rnn_sparsify: {msg}", RuntimeWarning, stacklevel=stacklevel)


def _static_checks(problem: LayerProblem) -> Optional[str]:
    if os.environ.get("RNN_SPARSIFY_CPU_KERNELS", "1") == "0":
        return "switched off by RNN_SPARSIFY_CPU_KERNELS=0"
    if problem.device_type != "cpu":
        return f"{problem.device_type} tensors (CPU kernels)"
    if problem.dtype != torch.float32:
        return f"dtype {problem.dtype} (the CPU kernels are float32)"
    if problem.proj_size:
        return "proj_size > 0 (no projection kernels)"
    if problem.packed:
        return "PackedSequence input (per-step batch sizes; no kernels for them)"
    if problem.func_transform:
        return "inside a torch.func transform (the kernels take plain tensors)"
    return None


def _spec(problem: LayerProblem):
    from .cpu_runtime import host_isa

    isa = host_isa()
    be = _BACKENDS.get(isa)
    if be is None:
        be = _BACKENDS[isa] = TvmCpuLayerBackend(isa)
    return be, be.spec_for(
        problem.input_size,
        problem.hidden_size,
        problem.batch,
        problem.in_keep or problem.input_size,
        problem.rec_keep or problem.hidden_size,
        problem.gate_coarse,
    )


def cpu_rule_dry(problem: LayerProblem):
    """What :func:`cpu_rule` would answer, without building or loading: ``("tvm_cpu", note)``
    or why not."""
    why = _static_checks(problem)
    if why:
        return why
    from . import cpu_runtime as rt

    if not rt.tvm_ffi_available():
        return "CPU kernels unavailable: apache-tvm-ffi is not installed"
    be, spec = _spec(problem)
    if spec in _FAILED:
        return _FAILED[spec]
    for root in rt._search_roots():
        if rt._valid_entry(rt.entry_dir(root, spec)):
            return ("tvm_cpu", f"{be.isa} kernels in {root}")
    if rt.tvm_available():
        return ("tvm_cpu", f"{be.isa} kernels, compiled on first use (a few seconds) and cached")
    return ("CPU kernels unavailable: none precompiled for this shape and apache-tvm is not "
            "installed to build them")


def cpu_rule(problem: LayerProblem):
    """The TVM CPU backend, or why not (see the module docstring)."""
    why = _static_checks(problem)
    if why:
        return why
    from .cpu_runtime import KernelUnavailable

    be, spec = _spec(problem)
    if spec in _FAILED:
        return _FAILED[spec]
    try:
        from .cpu_runtime import load_layer

        load_layer(spec)
    except Exception as e:  # unavailable, or a failed build: never retried, never an error
        kind = "" if isinstance(e, (KernelUnavailable, OSError, ImportError)) else f"{type(e).__name__}: "
        reason = f"CPU kernels unavailable: {kind}{e}"
        _FAILED[spec] = reason
        _warn_once(f"{reason}; the sparse LSTM runs on the PyTorch reference kernels (slower)", stacklevel=3)
        return reason
    return be


cpu_rule.dry = cpu_rule_dry
