"""Host side of the persistent training loops (``codegen/persistent_train.py``, issue 9 item 2):
weight layouts, buffer set-up and the split of work between the kernels and torch.

Pure torch (no TVM): ``launch`` is the cubin on a GPU (not wired into a backend yet) or the
CPU twin in the tests. Per layer/direction:

* ``Xg = x @ W_ih[:, kept]^T * a_in + b`` for all steps (outside, one GEMM);
* :func:`layer_forward`: one launch of the forward kernel -> ``y, h_T, c_T`` and the saved
  activations / cell states;
* :func:`layer_backward`: one launch of the backward-data kernel -> ``dNet`` of every step
  (selected), ``dh_0``, ``dc_0``; the weight gradients are one GEMM each afterwards
  (:func:`weight_grads`), ``dx = dNet @ W_ih`` likewise.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rnn_sparsify.codegen.persistent_train import KIND_BWD, KIND_FWD, KINDS

from .layer import LayerBackend


def pack_fwd_weights(w_hh: Tensor, spec) -> Tensor:
    """``W_hh`` (4H, H) -> ``(grid * 4U, H)`` rows interleaved by unit (row ``4u + g`` = gate
    ``g`` of unit ``u``), padding units zero, in the kernel dtype."""
    H, U = spec.hidden_size, spec.units
    out = torch.zeros(spec.slots, 4, H, dtype=getattr(torch, spec.dtype), device=w_hh.device)
    out[:H] = w_hh.reshape(4, H, H).transpose(0, 1)
    return out.reshape(spec.slots * 4, H).contiguous()


def pack_bwd_weights(w_hh: Tensor, spec) -> Tensor:
    """``W_hh`` (4H, H) -> ``W_hh^T`` padded to ``(grid * U, 4H)`` (row ``j`` = column ``j``)."""
    H = spec.hidden_size
    out = torch.zeros(spec.slots, 4 * H, dtype=getattr(torch, spec.dtype), device=w_hh.device)
    out[:H] = w_hh.t()
    return out.contiguous()


def pad_idx(idx: Tensor | None, T: int, spec, device) -> Tensor:
    """Kept units ``(T, k)`` -> int32 ``(T, spec.keep)`` padded with ``H``; None: all units."""
    H, K = spec.hidden_size, spec.keep
    if idx is None:
        idx = torch.arange(H, device=device).expand(T, H)
    if idx.shape[1] > K:
        raise ValueError(f"{idx.shape[1]} kept units per step > the kernel's {K}")
    out = torch.full((T, K), H, dtype=torch.int32, device=device)
    out[:, :idx.shape[1]] = idx.to(torch.int32)
    return out


def _unit_major(v: Tensor, spec) -> Tensor:
    """(..., B, H) -> (..., slots * Bp) float32, ``[j*Bp + b]``, zero padding."""
    H, Bp = spec.hidden_size, spec.batch
    lead = v.shape[:-2]
    out = torch.zeros(*lead, spec.slots, Bp, dtype=torch.float32, device=v.device)
    out[..., :H, :v.shape[-2]] = v.transpose(-1, -2).float()
    return out.reshape(*lead, spec.slots * Bp)


def _from_unit_major(v: Tensor, spec, B: int) -> Tensor:
    """Inverse of :func:`_unit_major` (first ``H * Bp`` values) -> (..., B, H)."""
    H, Bp = spec.hidden_size, spec.batch
    lead = v.shape[:-1]
    return v[..., :H * Bp].reshape(*lead, H, Bp)[..., :B].transpose(-1, -2)


def layer_forward(xg: Tensor, h0: Tensor, c0: Tensor, idx: Tensor | None, scale: float, w_fwd: Tensor, spec,
                  launch: Callable[..., None]):
    """``xg`` (T, B, 4H), ``h0``/``c0`` (B, H), ``idx`` (T, k) kept units of h_{t-1} or None,
    ``scale`` = H / k. Returns ``(y (T, B, H), h_T, c_T, saved)``; ``saved`` holds the kernel
    buffers the backward needs (``Ac``, ``Cs``, ``Hs``, ``idx``)."""
    T, B, H4 = xg.shape
    H, Bp = spec.hidden_size, spec.batch
    if H4 != 4 * H or B > Bp:
        raise ValueError(f"xg must be (T, <= {Bp}, {4 * H}), got {tuple(xg.shape)}")
    dt, dev = getattr(torch, spec.dtype), xg.device
    Xg = torch.zeros(T, Bp, H4, dtype=dt, device=dev)
    Xg[:, :B] = xg
    Hs = torch.zeros(T + 1, spec.h_len, dtype=dt, device=dev)
    Hs[0, :spec.slots * Bp] = _unit_major(h0, spec).to(dt)
    Cs = torch.zeros(T + 1, spec.slots * Bp, dtype=torch.float32, device=dev)
    Cs[0] = _unit_major(c0, spec)
    Ac = torch.zeros(T, 4 * spec.slots * Bp, dtype=torch.float32, device=dev)
    ix = pad_idx(idx, T, spec, dev)
    bar = torch.zeros(1, dtype=torch.int32, device=dev)  # the barrier counter starts at 0 every launch
    launch(Xg=Xg, idx=ix, W=w_fwd, Hs=Hs, Cs=Cs, Ac=Ac, bar=bar, a=float(scale))
    y = _from_unit_major(Hs[1:], spec, B)
    cT = _from_unit_major(Cs[T], spec, B)
    return y, y[-1], cT, {"Ac": Ac, "Cs": Cs, "Hs": Hs, "idx": ix, "scale": float(scale), "B": B}


def gates(saved: dict, spec) -> Tensor:
    """The activations i, f, g, o of every step as (T, B, 4H) (gate-major, like nn.LSTM)."""
    Ac, B = saved["Ac"], saved["B"]
    H, Bp = spec.hidden_size, spec.batch
    T = Ac.shape[0]
    a = Ac.reshape(T, spec.slots, 4, Bp)[:, :H, :, :B]  # (T, H, 4, B)
    return a.permute(0, 3, 2, 1).reshape(T, B, 4 * H)


def cells(saved: dict, spec) -> Tensor:
    """c_t of every step (T, B, H)."""
    return _from_unit_major(saved["Cs"][1:], spec, saved["B"])


def layer_backward(saved: dict, dy: Tensor, dh_T: Tensor, dc_T: Tensor, w_bwd: Tensor, spec,
                   launch: Callable[..., None]):
    """``dy`` (T, B, H) gradient of the outputs, ``dh_T``/``dc_T`` (B, H). Returns ``(dnet (T, B,
    4H) selected, dh_0, dc_0, kept)``; ``kept`` (T, 4H/P) int32 slice flags with coarse
    selection, else None."""
    T, B, _ = dy.shape
    H, Bp = spec.hidden_size, spec.batch
    dt, dev = getattr(torch, spec.dtype), dy.device
    dY = _unit_major(dy, spec).contiguous()
    DH = _unit_major(dh_T, spec).contiguous()
    DC = _unit_major(dc_T, spec).contiguous()
    Dn = torch.zeros(T, 4 * H * Bp, dtype=dt, device=dev)
    bar = torch.zeros(1, dtype=torch.int32, device=dev)
    ns = max(spec.n_slices, 1)
    Sq = torch.zeros(T, 4 * H, dtype=torch.float32, device=dev)
    Kp = torch.zeros(T, ns, dtype=torch.int32, device=dev)
    launch(dY=dY, Ac=saved["Ac"], Cs=saved["Cs"], idx=saved["idx"], Wb=w_bwd, DH=DH, DC=DC, Dn=Dn, bar=bar,
           Sq=Sq, Kp=Kp, a=saved["scale"])
    dnet = Dn.reshape(T, 4 * H, Bp)[:, :, :B].transpose(1, 2)
    return dnet, _from_unit_major(DH, spec, B), _from_unit_major(DC, spec, B), (Kp if spec.coarse else None)


def weight_grads(dnet: Tensor, x: Tensor, in_idx: Tensor | None, in_scale: float, hprev: Tensor,
                 rec_idx: Tensor | None, rec_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``dW_ih, dW_hh, db`` as one GEMM each over all ``T*B`` rows of the masked, scaled GEMM
    inputs (the dropped units are zero columns, which give zero gradient columns)."""
    def masked(v, idx, a):
        if idx is None:
            return v
        m = torch.zeros(v.shape[0], v.shape[-1], dtype=v.dtype, device=v.device)
        m.scatter_(1, idx.long(), a)
        return v * m[:, None, :]

    T, B, H4 = dnet.shape
    d = dnet.reshape(T * B, H4)
    xm = masked(x, in_idx, in_scale).reshape(T * B, -1)
    hm = masked(hprev, rec_idx, rec_scale).reshape(T * B, -1)
    return d.t() @ xm, d.t() @ hm, d.sum(0)


def twin_launcher(fn, spec) -> Callable[..., None]:
    """``launch`` for the CPU twin ``fn`` (the kernel's buffers by name)."""
    if spec.part == "fwd":
        return lambda **b: fn(b["Xg"], b["idx"], b["W"], b["Hs"], b["Cs"], b["Ac"], b["bar"], b["a"])
    return lambda **b: fn(b["dY"], b["Ac"], b["Cs"], b["idx"], b["Wb"], b["DH"], b["DC"], b["Dn"], b["bar"],
                          b["Sq"], b["Kp"], b["a"])


class PersistentTrainLayerBackend(LayerBackend):
    """A layer backend (``rnn_sparsify/kernels/layer.py``'s contract) running one layer and
    direction on the two persistent kernels: ``Xg`` by one GEMM, the forward kernel, the
    backward-data kernel, then ``dx``, ``dW_ih``, ``dW_hh``, ``db`` by one GEMM each.

    ``launch_fwd``/``launch_bwd`` are the kernels' launch callables (:class:`TrainKernels` on a
    GPU, the CPU twins in the tests) for ``fwd_spec``/``bwd_spec``. Takes padded sequences
    (no packed batch sizes), no projection, ``plan.gate_sparsity`` None or coarse with the
    kernel's ``(P, R, S)``, the kernel's kept count. :func:`persistent_train_rule` selects it on CUDA when the
    configured bundle has kernels for the call (see ``docs/persistent_kernels.md``)."""

    name = "persistent_train"

    def __init__(self, fwd_spec, bwd_spec, launch_fwd, launch_bwd):
        self.fs, self.bs, self.launch_fwd, self.launch_bwd = fwd_spec, bwd_spec, launch_fwd, launch_bwd

    def problem(self, x, w_hh, w_hr, plan) -> str | None:
        """Why this backend cannot take the call (None: it can)."""
        gsp = plan.gate_sparsity
        coarse = (gsp.P, gsp.R, gsp.S) if gsp is not None and gsp.mode == "coarse" else ()
        if w_hr is not None or plan.batch_sizes is not None:
            return "projections and packed sequences are not supported"
        if gsp is not None and coarse != self.bs.coarse:
            return f"gate sparsity {gsp.mode} {coarse or ''} is not the kernel's fused selection {self.bs.coarse}"
        if gsp is None and self.bs.coarse:
            return "the kernel selects coarse gate gradients; the plan has no gate sparsity"
        H = w_hh.shape[1]
        k = H if plan.rec_idx is None else plan.rec_idx.shape[1]
        if H != self.fs.hidden_size or k > self.fs.keep or x.shape[1] > self.fs.batch:
            return (f"hidden {H}, {k} kept units, batch {x.shape[1]} do not fit the kernels' hidden "
                    f"{self.fs.hidden_size}, {self.fs.keep} kept, batch {self.fs.batch}")
        return None

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, plan):
        why = self.problem(x, w_hh, w_hr, plan)
        if why:
            raise ValueError(f"persistent_train backend: {why}")
        from .reference import ReferenceBackend

        xg = ReferenceBackend().fwd_input(x, w_ih, plan.in_idx, plan.in_scale)
        if b_ih is not None:
            xg = xg + (b_ih + b_hh)
        rec = plan.rec_idx
        if plan.reverse:  # the kernel runs in processing order
            xg, rec = xg.flip(0), (None if rec is None else rec.flip(0))
        y, hT, cT, ks = layer_forward(xg, h0, c0, rec, plan.rec_scale, pack_fwd_weights(w_hh, self.fs), self.fs,
                                      self.launch_fwd)
        hprev = torch.cat([h0[None].to(y.dtype), y[:-1]])  # processing order
        if plan.reverse:
            y, hprev = y.flip(0), hprev.flip(0)
        y = y.to(x.dtype)
        saved = (x, w_ih, w_hh, hprev.to(x.dtype), ks["Ac"], ks["Cs"], ks["idx"])
        meta = {"scale": ks["scale"], "B": ks["B"], "has_bias": b_ih is not None}
        return y, hT.to(x.dtype), cT.to(x.dtype), saved, meta

    def backward(self, saved, meta, plan, dy, dhn, dcn, needs):
        x, w_ih, w_hh, hprev, Ac, Cs, idx = saved
        ks = {"Ac": Ac, "Cs": Cs, "idx": idx, "scale": meta["scale"], "B": meta["B"]}
        dyp = dy.flip(0) if plan.reverse else dy
        dnet, dh0, dc0, _kept = layer_backward(ks, dyp, dhn, dcn, pack_bwd_weights(w_hh, self.bs), self.bs,
                                               self.launch_bwd)
        dnet = (dnet.flip(0) if plan.reverse else dnet).to(x.dtype)
        dx = dnet @ w_ih  # dense GEMM; dropped input units are then zeroed (output sparsity)
        if plan.in_idx is not None:
            m = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
            m.scatter_(1, plan.in_idx.long(), plan.in_scale)
            dx = dx * m[:, None, :]
        dw_ih, dw_hh, db = weight_grads(dnet, x, plan.in_idx, plan.in_scale, hprev, plan.rec_idx, plan.rec_scale)
        db_ih = db if meta["has_bias"] and needs[5] else None
        db_hh = db.clone() if meta["has_bias"] and needs[6] else None
        return (dx if needs[0] else None, dh0.to(x.dtype), dc0.to(x.dtype), dw_ih if needs[3] else None,
                dw_hh if needs[4] else None, db_ih, db_hh, None)


class TrainKernels:
    """The persistent training entries of a bundle loaded on one CUDA device (cuda-bindings,
    no TVM): ``launcher(entry)`` gives the ``launch`` of :func:`layer_forward` /
    :func:`layer_backward` (``cuLaunchCooperativeKernel`` on torch's current stream, like
    :class:`~rnn_sparsify.kernels.persistent_eval.PersistentKernels`), used by
    :func:`persistent_train_rule` and the GPU test."""

    def __init__(self, path, device: torch.device):
        from pathlib import Path

        from rnn_sparsify.codegen.manifest import Manifest

        from .cuda_loader import device_arch
        from .persistent_eval import load_cooperative

        self.path, self.device = Path(path), device
        arch = device_arch(device)
        self.entries = [e for e in Manifest.load(self.path).kernels if e.spec.get("kind") in KINDS and e.arch == arch]
        self._modules, self._fn, self.why = load_cooperative(self.path, device, self.entries)

    def launcher(self, entry) -> Callable[..., None]:
        import numpy as np

        from .cuda_loader import _driver, check

        if entry.key not in self._fn:
            raise RuntimeError(self.why.get(entry.key, f"{entry.symbol}: not loaded"))
        fn, cu = self._fn[entry.key], _driver()

        def launch(**bufs):
            holders = []
            for p in entry.params:
                if p.pointer:
                    holders.append(np.array([bufs[p.name].data_ptr()], dtype=np.uint64))
                elif p.name == "Tn":  # the number of steps
                    holders.append(np.array([bufs["idx"].shape[0]], dtype=np.int32))
                else:  # the dropout scale a
                    holders.append(np.array([bufs[p.name]], dtype=np.float32))
            params = np.array([h.ctypes.data for h in holders], dtype=np.uint64)
            stream = torch.cuda.current_stream(self.device).cuda_stream
            check(cu.cuLaunchCooperativeKernel(fn, *entry.grid, *entry.block, entry.dynamic_smem_bytes,
                                               cu.CUstream(stream), params.ctypes.data),
                  f"cuLaunchCooperativeKernel({entry.symbol})")
            del holders  # the driver copied the argument values at launch (no host sync, as for the GEMMs)

        return launch


# -- the layer-backend rule -------------------------------------------------------------
_DT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_TRAIN_KERNELS: dict = {}  # (bundle path, device index) -> TrainKernels or the load error (str)
_MANIFESTS: dict = {}  # bundle path -> its manifest entries


def match_entries(entries, problem):
    """The ``(fwd, bwd)`` manifest entries of a bundle that run ``problem`` (a
    :class:`~rnn_sparsify.kernels.layer.LayerProblem`), or the reason none does: same hidden
    size and dtype, batch and kept count within the kernels' (smaller batches and kept sets
    are padded), the backward's fused coarse selection equal to the plan's (none: none).
    Among several, the smallest kernels (batch, then kept count) win, then the largest grid."""
    if problem.packed or problem.proj_size:
        return "packed sequences and projections are not supported by the persistent training loops"
    if problem.gate_mode not in (None, "coarse"):
        return f"{problem.gate_mode} gate-gradient selection is not fused in the persistent loops (coarse only)"
    dt, H, B = _DT.get(problem.dtype), problem.hidden_size, problem.batch
    k = H if problem.rec_keep is None else problem.rec_keep
    coarse = tuple(problem.gate_coarse) if problem.gate_mode == "coarse" else ()

    def fits(e):
        sp = e.spec
        return (sp["hidden_size"] == H and sp["dtype"] == dt and sp["batch"] >= B and sp["keep"] >= k
                and (sp["part"] == "fwd" or tuple(sp.get("coarse") or ()) == coarse))

    def key(e):  # the smallest kernels; of equal ones (several --sms grids) the largest grid
        return e.spec["batch"], e.spec["keep"], -e.spec["grid"]

    fwd = sorted((e for e in entries if e.spec.get("kind") == KIND_FWD and fits(e)), key=key)
    bwd = sorted((e for e in entries if e.spec.get("kind") == KIND_BWD and fits(e)), key=key)
    if not fwd or not bwd:
        return (f"no persistent training kernels in the bundle for hidden {H}, batch <= their batch {B}, "
                f"{k} kept units, {dt}, coarse {coarse or 'none'} (rnn-sparsify compile --persistent-train)")
    return fwd[0], bwd[0]


def _bundle_path():
    from . import _configure_from_env
    from .cuda_backend import _config

    _configure_from_env(torch.device("cuda"))
    return _config.get("path")


def _bundle_entries(path) -> list:
    """The manifest entries of the bundle at ``path``, read once per process (the rule runs
    for every layer call; bundles are content-addressed folders written by ``compile``)."""
    key = str(path)
    if key not in _MANIFESTS:
        from rnn_sparsify.codegen.manifest import Manifest

        _MANIFESTS[key] = Manifest.load(path).kernels
    return _MANIFESTS[key]


def persistent_train_rule(problem):
    """Layer-backend rule: the persistent training loops of the configured bundle
    (``RNN_SPARSIFY_KERNELS`` / ``cuda_backend.use_bundle``) for a CUDA layer call whose shape,
    dtype, dropout and coarse selection they were built for; else the reason (the per-step
    GEMM composition runs). Predicted, not measured: faster than that composition (one launch
    per layer and direction instead of a GEMM and ~10 element-wise kernels per step), 0.6-1.0x
    of cuDNN's dense loop at 2x1500 (docs/persistent_kernels.md)."""
    if problem.device_type != "cuda":
        return "not a CUDA device"
    if problem.func_transform:
        return "inside a torch.func transform"
    path = _bundle_path()
    if path is None:
        return "no kernel bundle (RNN_SPARSIFY_KERNELS or cuda_backend.use_bundle)"
    m = match_entries(_bundle_entries(path), problem)
    if isinstance(m, str):
        return m
    index = problem.device.index if problem.device.index is not None else torch.cuda.current_device()
    kern = _TRAIN_KERNELS.get((str(path), index))
    if kern is None:
        try:
            kern = TrainKernels(path, torch.device("cuda", index))
        except Exception as e:  # no cuda-bindings, driver refusal, hash mismatch: the next rule
            kern = f"the bundle's persistent training kernels could not be loaded: {type(e).__name__}: {e}"
        _TRAIN_KERNELS[(str(path), index)] = kern
    if isinstance(kern, str):
        return kern
    from rnn_sparsify.codegen.persistent_train import PersistentTrainSpec

    usable = match_entries([e for e in _bundle_entries(path) if e.key not in kern.why], problem)
    fe, be = usable if not isinstance(usable, str) else m  # none co-resident: report the best one's reason
    for e in (fe, be):
        if e.key in kern.why:
            return kern.why[e.key]
    fs, bs = PersistentTrainSpec.from_dict(fe.spec), PersistentTrainSpec.from_dict(be.spec)
    return PersistentTrainLayerBackend(fs, bs, kern.launcher(fe), kern.launcher(be))


def _dry(problem):
    """``persistent_train_rule`` without loading anything (reports, ``rnn-sparsify env``)."""
    if problem.device_type != "cuda":
        return "not a CUDA device"
    path = _bundle_path()
    if path is None:
        return "no kernel bundle (RNN_SPARSIFY_KERNELS or cuda_backend.use_bundle)"
    m = match_entries(_bundle_entries(path), problem)
    return m if isinstance(m, str) else ("persistent_train", f"{m[0].symbol} + {m[1].symbol} (co-residency checked at load)")


persistent_train_rule.dry = _dry


__all__ = ["PersistentTrainLayerBackend", "TrainKernels", "cells", "gates", "layer_backward", "layer_forward", "pack_bwd_weights", "match_entries", "pack_fwd_weights", "pad_idx",
           "persistent_train_rule",
           "twin_launcher", "weight_grads"]
