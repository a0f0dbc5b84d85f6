"""``eval()`` of a weight-sparse ``SparseLSTM`` on CUDA with the sparse persistent kernels.

The GPU counterpart of :mod:`.cpu_sparse_eval`. For each layer and direction: the input
projection of all steps is one dense GEMM on the masked ``W_ih`` (torch/cuBLAS), then ONE
launch of the persistent kernel of :mod:`rnn_sparsify.codegen.persistent_sparse` runs the
whole recurrence with the non-zeros of ``W_hh`` on chip (format packed here, once per weight
version). Where it does not apply, ``nn.LSTM.forward`` (cuDNN) runs, exactly as before, and
``module.last_eval_backend`` / ``module.last_eval_reason`` say why:

* the module is on a CUDA device, carries weight-sparsity masks on ``W_hh``, no ``proj_size``,
  no gradient needed, float32/float16/bfloat16 parameters and input (no autocast), a plain
  (not packed) sequence;
* a bundle is in use (:func:`use_bundle` or ``RNN_SPARSIFY_KERNELS``) with an entry for this
  GPU's arch, the hidden size, the dtype, a batch >= the call's and a non-zero bound >= the
  densest row of every ``W_hh`` (:func:`choose_entry`);
* the entry's grid is co-resident on this GPU (occupancy API at load), else a warning and
  cuDNN; a launch the driver refuses also falls back (with a warning), for good on that device;
* **measured routing** (``RNN_SPARSIFY_PERSISTENT_EVAL``, :func:`eval_mode`; default ``auto``):
  ``nn.LSTM`` on the same masked weights computes the same function, so the kernels run only
  where they are faster. The first call for a key (:func:`routing_key`: GPU, arch and SM count,
  sizes, layers, direction, batch, sequence length, dtype, bundle entries) times both paths
  (:func:`time_paths`: CUDA events, one warm-up each, the median of a few interleaved runs), and
  the verdict is cached for the process (:func:`routing_verdicts`); from then on the faster runs
  (like ``torch.backends.cudnn.benchmark``). ``always``: the kernels whenever they apply (tests,
  benchmarks of the kernels themselves); ``never``: nn.LSTM. A loss warns once per key.

Only :func:`pack_ell`, :func:`choose_entry`, :func:`layer_forward` (with any ``launch``
callable), the rule (:func:`why_not_static`) and the routing (with a fake timer,
:func:`set_timer`) are exercised without a GPU (the tests run :func:`layer_forward` on the
kernel's CPU twin); the driver calls need cuda-bindings and a GPU.
"""
from __future__ import annotations

import os
import statistics
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from rnn_sparsify.codegen.errors import BundleError
from rnn_sparsify.codegen.persistent_sparse import KIND, PersistentSparseSpec

BACKEND = "tvm_cuda_persistent_eval"
DENSE = "nn.LSTM"
ENV_VAR = "RNN_SPARSIFY_KERNELS"
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

MODE_ENV_VAR = "RNN_SPARSIFY_PERSISTENT_EVAL"
MODES = ("auto", "always", "never")
TIMING_REPEATS = 5  # timed runs per path on the first call for a key (after one warm-up each)

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_config: dict = {"path": None, "mode": None}
_loaded: dict = {}  # (device index, bundle path) -> PersistentKernels | str (why not)
_WARNED: set = set()


# -- format ------------------------------------------------------------------------------

def row_nnz_max(w_hh: Tensor) -> int:
    """Non-zeros of the densest gate row of ``w_hh`` (4H, H)."""
    return int((w_hh != 0).sum(1).max()) if w_hh.numel() else 0


def h_slots(spec: PersistentSparseSpec) -> Optional[int]:
    """Shared-memory slots per wavefront of the kernel's load of ``h[col, 0..B)``: one load
    of ``B * bytes`` (4, 8 or 16) per column, 128 bytes per wavefront -> 32, 16 or 8 slots
    (column ``k`` is in slot ``k % slots``); None when the load is not one vector."""
    cb = spec.batch * {"float32": 4, "float16": 2, "bfloat16": 2}[spec.dtype]
    if spec.batch not in (1, 2, 4) or cb not in (4, 8, 16):
        return None
    n = 128 // cb
    return n if n % spec.split == 0 else None


def bank_aware_order(rows: Tensor, cols: Tensor, spec: PersistentSparseSpec) -> Tensor:
    """A permutation of the non-zeros ``(rows, cols)`` (sorted by row) that keeps each row's
    entries together and orders them so that the ``split`` entries a row's threads read at the
    same instruction (positions ``split*j .. split*j + split - 1``) fall in different slots of
    h, and so do those of the rows sharing a wavefront (``slots / split`` consecutive rows:
    row ``p`` of them takes slot range ``p`` at even iterations, the next one at odd ones...):
    entries sorted by (rank within their (row, slot) bucket, rotated slot). Conflict-free while
    every bucket of the row still has entries; the rest of the row is in slot order."""
    ns = h_slots(spec)
    n = rows.numel()
    if ns is None or n == 0:
        return torch.arange(n, device=rows.device)
    S = spec.split
    slot = cols % ns
    phase = (rows % spec.rows) % (ns // S)  # position of the row in its wavefront
    slot_r = (slot + phase * S) % ns
    group = rows * ns + slot
    o1 = torch.argsort(group * (spec.hidden_size + 1) + cols)
    _, counts = torch.unique_consecutive(group[o1], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    q = torch.empty_like(rows)
    q[o1] = torch.arange(n, device=rows.device) - starts
    return torch.argsort((rows * (int(q.max()) + 1) + q) * ns + slot_r)


def pack_ell(w_hh: Tensor, spec: PersistentSparseSpec, *, bank_aware: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``(Wv, Wc)``: ``w_hh`` (4H, H, gate-major like ``nn.LSTM``) in the kernel's format.

    Row ``4*j + g`` holds gate ``g`` of unit ``j`` (rows past ``4H`` are empty); each row's
    non-zeros in the :func:`bank_aware_order` (``bank_aware=False``: column order), padded to
    ``spec.nnz`` with ``(col 0, value 0)``. Raises ValueError when a row has more non-zeros
    than the bound. A ``spec.packed`` kernel takes ``(Wp, None)`` instead: one int32 word per
    entry, the value's 16 bits in the high half and the column in the low half
    (:func:`pack_words`)."""
    H = spec.hidden_size
    if tuple(w_hh.shape) != (4 * H, H):
        raise ValueError(f"W_hh must be ({4 * H}, {H}), got {tuple(w_hh.shape)}")
    w = w_hh.detach().reshape(4, H, H).transpose(0, 1).reshape(4 * H, H)
    nz = w != 0
    counts = nz.sum(1)
    if counts.numel() and int(counts.max()) > spec.nnz:
        raise ValueError(f"a gate row has {int(counts.max())} non-zeros, the kernel holds at most {spec.nnz}")
    rows, cols = nz.nonzero(as_tuple=True)  # row-major: columns ascending within a row
    if bank_aware:
        perm = bank_aware_order(rows, cols, spec)
        rows, cols = rows[perm], cols[perm]
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=w.device) - first[rows]
    idt = getattr(torch, spec.idx_dtype)
    Wv = torch.zeros(spec.rows_total, spec.nnz, dtype=getattr(torch, spec.dtype), device=w.device)
    Wc = torch.zeros(spec.rows_total, spec.nnz, dtype=idt, device=w.device)
    Wv[rows, slot] = w[rows, cols].to(Wv.dtype)
    Wc[rows, slot] = cols.to(idt)
    if spec.packed:
        return pack_words(Wv, Wc), None
    return Wv, Wc


def pack_words(Wv: Tensor, Wc: Tensor) -> Tensor:
    """The packed-word format of 16-bit values ``Wv`` and their columns ``Wc`` (same shape):
    ``int32(bits(value) << 16 | column)`` (two's complement, as the kernel reads it)."""
    bits = Wv.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    word = (bits << 16) | (Wc.to(torch.int64) & 0xFFFF)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def unpack_words(Wp: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(values, columns)`` of a packed-word format (the inverse of :func:`pack_words`)."""
    w = Wp.to(torch.int64) & 0xFFFFFFFF
    bits = (w >> 16).to(torch.int32)
    bits = torch.where(bits >= 2 ** 15, bits - 2 ** 16, bits).to(torch.int16)
    return bits.view(dtype), (w & 0xFFFF).to(torch.int32)


def h_wavefronts(Wc: Tensor, spec: PersistentSparseSpec) -> float:
    """Model of the bank conflicts of the h gather: mean shared-memory wavefronts per warp-wide
    load of ``h[col]`` over the packed format (lanes in wavefronts of ``slots`` consecutive
    threads; a wavefront takes as many passes as its most-used slot holds distinct columns).
    The minimum is ``32 / slots`` (2 for bf16 x 4)."""
    ns = h_slots(spec)
    if ns is None:
        raise ValueError("the h load of this spec is not one vector per column")
    S, R4 = spec.split, spec.rows
    c = Wc.long().reshape(spec.grid, R4, spec.nnz // S, S)  # [cta, row, iteration, lane]
    c = c.permute(0, 2, 1, 3).reshape(spec.grid, spec.nnz // S, -1)  # [cta, iteration, thread]
    T = c.shape[-1]
    c = torch.cat([c, c.new_full((*c.shape[:2], (-T) % ns), -1)], -1)  # idle lanes: no load
    waves = c.reshape(*c.shape[:2], -1, ns)  # [cta, iteration, wavefront, lane]
    srt = waves.sort(-1).values
    distinct = torch.ones_like(srt, dtype=torch.bool)
    distinct[..., 1:] = srt[..., 1:] != srt[..., :-1]
    distinct &= srt >= 0
    per_slot = torch.zeros(*srt.shape[:-1], ns, dtype=torch.long)
    per_slot.scatter_add_(-1, srt.clamp(min=0) % ns, distinct.long())
    passes = per_slot.max(-1).values.clamp(min=1)  # [cta, iteration, wavefront]
    per_warp = passes.reshape(*passes.shape[:2], -1, 32 // ns).sum(-1)
    return float(per_warp.double().mean())


def unpack_ell(Wv: Tensor, Wc: Optional[Tensor], spec: PersistentSparseSpec) -> Tensor:
    """The dense (4H, H) gate-major matrix of a packed format (tests, debugging); for a
    ``spec.packed`` format ``Wv`` holds the words and ``Wc`` is ignored."""
    H = spec.hidden_size
    if spec.packed:
        Wv, Wc = unpack_words(Wv, getattr(torch, spec.dtype))
    d = torch.zeros(spec.rows_total, H, dtype=torch.float64, device=Wv.device)
    d.scatter_add_(1, Wc.long(), Wv.double())
    return d[:4 * H].reshape(H, 4, H).transpose(0, 1).reshape(4 * H, H)


def layer_forward(xg: Tensor, h0: Tensor, c0: Tensor, Wv: Tensor, Wc: Tensor, spec: PersistentSparseSpec,
                  launch: Callable[..., None]) -> tuple[Tensor, Tensor, Tensor]:
    """One layer/direction: ``xg`` (T, B, 4H) = x @ W_ih.T + biases, ``h0``/``c0`` (B, H).

    Allocates the kernel's buffers (batch padded to ``spec.batch``), calls
    ``launch(Xg=, Hs=, Wv=, Wc=, C=, bar=)`` once (a packed spec: ``Wp=`` the words passed as
    ``Wv``, instead of ``Wv``/``Wc``), returns ``(out (T, B, H), h_T, c_T)`` in ``xg``'s dtype.
    ``launch`` is the cubin on a GPU, or the CPU twin in the tests."""
    T, B, H4 = xg.shape
    H, Bp = spec.hidden_size, spec.batch
    if H4 != 4 * H or B > Bp:
        raise ValueError(f"xg must be (T, <= {Bp}, {4 * H}), got {tuple(xg.shape)}")
    dt, dev = getattr(torch, spec.dtype), xg.device
    Xg = xg.to(dt)
    if B < Bp:
        Xg = torch.cat([Xg, Xg.new_zeros(T, Bp - B, H4)], 1)
    Xg = Xg.contiguous()
    Hs = torch.zeros(T + 1, spec.h_len, dtype=dt, device=dev)
    Hs[0, :H * Bp].view(H, Bp)[:, :B] = h0.t().to(dt)
    C = torch.zeros(spec.grid * spec.units * Bp, dtype=dt, device=dev)
    C[:H * Bp].view(H, Bp)[:, :B] = c0.t().to(dt)
    bar = torch.zeros(1, dtype=torch.int32, device=dev)  # the barrier counter starts at 0 every launch
    weights = {"Wp": Wv} if spec.packed else {"Wv": Wv, "Wc": Wc}
    launch(Xg=Xg, Hs=Hs, **weights, C=C, bar=bar)
    out = Hs[1:, :H * Bp].view(T, H, Bp)[:, :, :B].permute(0, 2, 1)
    cT = C[:H * Bp].view(H, Bp)[:, :B].t()
    return out.to(xg.dtype), out[-1].to(xg.dtype), cT.to(xg.dtype)


# -- bundle entries ----------------------------------------------------------------------

def persistent_entries(manifest) -> list:
    return [e for e in manifest.kernels if e.spec.get("kind") == KIND]


def choose_entry(entries, arch: str, hidden: int, batch: int, dtype: str, nnz: int):
    """The entry for one layer: this arch, hidden size and dtype, the smallest batch >= ``batch``,
    then the smallest non-zero bound >= ``nnz``, then the largest grid (a bundle built with
    several ``--sms``; the caller passes only the entries co-resident on its GPU); None when
    there is none."""
    ok = [e for e in entries if e.arch == arch and e.spec["hidden_size"] == hidden and e.spec["dtype"] == dtype
          and e.spec["batch"] >= batch and e.spec["nnz"] >= nnz]
    if not ok:
        return None
    return min(ok, key=lambda e: (e.spec["batch"], e.spec["nnz"], -e.spec["grid"]))


def describe_missing(entries, arch: str, hidden: int, batch: int, dtype: str, nnz: int) -> str:
    have = sorted({(e.arch, e.spec["hidden_size"], e.spec["batch"], e.spec["dtype"], e.spec["nnz"]) for e in entries})
    return (f"no persistent kernel for {arch}, hidden {hidden}, batch {batch}, {dtype}, >= {nnz} non-zeros per "
            f"gate row in the bundle (it has {have or 'none'}); build one with `rnn-sparsify compile "
            f"--persistent-eval --nnz-max {nnz} ...`")


# -- the rule ----------------------------------------------------------------------------

def why_not_module(mod) -> Optional[str]:
    """Why the persistent kernels can run no call of ``mod``, whatever its input (None: some can);
    the part of :func:`why_not_static` that ``rnn-sparsify env`` reports ahead of a run."""
    from .cpu_sparse_eval import _masked

    if getattr(mod, "weight_sparsity", None) is None:
        return "no weight sparsity"
    if not hasattr(mod, "proj_size"):
        return "no persistent kernels for cells"
    if "hh" not in {m.kind for m in _masked(mod)}:
        return "W_hh is not masked (the recurrence would stay dense)"
    if mod.proj_size:
        return "proj_size > 0 (no projection kernels)"
    return None


def why_not_static(mod, input, hx) -> Optional[str]:
    """Why the persistent kernels do not apply to this call, before looking at a bundle."""
    why = why_not_module(mod)
    if why:
        return why
    packed = isinstance(input, PackedSequence)
    if packed:
        batch_sizes = input.batch_sizes
        input = input.data  # the checks below are on the packed rows (N, input_size)
    if not isinstance(input, Tensor):
        return "unexpected input type (nn.LSTM reports the error)"
    if input.device.type != "cuda":
        return f"input on {input.device} (the persistent kernels run on CUDA)"
    params = [p for p in mod._flat_weights if p is not None]
    if any(p.device != input.device or p.dtype != input.dtype for p in params) or input.dtype not in _DTYPES:
        return "parameters and input must share one CUDA device and a float32/float16/bfloat16 dtype"
    if torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in params)):
        return "gradients are needed (run eval under torch.no_grad() or torch.inference_mode())"
    try:
        autocast = torch.is_autocast_enabled("cuda")
    except TypeError:  # pragma: no cover - torch < 2.4
        autocast = torch.is_autocast_enabled()
    if autocast:
        return "autocast is on"
    if hx is not None and isinstance(hx, (tuple, list)) and any(getattr(h, "dtype", None) != input.dtype
                                                                for h in hx):
        return "hx dtype differs from the input's (nn.LSTM reports the error)"
    if input.dim() != (2 if packed else 3) or input.shape[-1] != mod.input_size or input.numel() == 0:
        return "unexpected input shape (only batched 3-d input; nn.LSTM reports errors)"
    B = int(batch_sizes[0]) if packed else input.shape[0 if mod.batch_first else 1]
    return hx_problem(mod, hx, B, input.device)


def hx_problem(mod, hx, batch: int, device) -> Optional[str]:
    """Why ``hx`` cannot be the initial state of a call of ``batch`` rows on ``device`` (then
    ``nn.LSTM`` runs and raises its own error), or None."""
    if hx is None:
        return None
    want = ((2 if mod.bidirectional else 1) * mod.num_layers, batch, mod.hidden_size)
    if (not isinstance(hx, (tuple, list)) or len(hx) != 2
            or any(not isinstance(h, Tensor) or tuple(h.shape) != want or h.device != device for h in hx)):
        return "unexpected hx (nn.LSTM reports the error)"
    return None


def use_bundle(path) -> None:
    """Use the persistent kernels of the bundle at ``path`` (None: stop). Defaults to
    ``$RNN_SPARSIFY_KERNELS``."""
    _config["path"] = None if path is None else str(path)
    _loaded.clear()


def bundle_path() -> Optional[str]:
    """This module's bundle, else the GEMM backend's (``cuda_backend.use_bundle``), else
    ``$RNN_SPARSIFY_KERNELS``."""
    if _config["path"]:
        return _config["path"]
    from . import cuda_backend

    return cuda_backend._config.get("path") or os.environ.get(ENV_VAR) or None


def _warn_once(key, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"rnn_sparsify: {msg}", RuntimeWarning, stacklevel=4)


def load_cooperative(path, device: torch.device, entries) -> tuple[list, dict, dict]:
    """Load the cubins of cooperative (persistent) kernel ``entries`` of the bundle at ``path``
    into torch's context on ``device`` (cuda-bindings, no TVM): ``(modules, function by entry
    key, why by entry key)``. An entry whose grid cannot be co-resident here (occupancy API x
    SM count, cooperative-launch support) gets a reason instead of a function. Used by the
    eval kernels' :class:`PersistentKernels` and the training loops' ``TrainKernels``."""
    from rnn_sparsify.codegen.manifest import read_verified

    from .cuda_loader import _driver, check

    cu = _driver()
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.empty(1, device=device)
    check(cu.cuInit(0), "cuInit")
    dev = check(cu.cuDeviceGet(device.index or 0), "cuDeviceGet")
    check(cu.cuCtxSetCurrent(check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")), "cuCtxSetCurrent")
    sms = check(cu.cuDeviceGetAttribute(
        cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute")
    coop = check(cu.cuDeviceGetAttribute(
        cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH, dev), "cuDeviceGetAttribute")
    modules, fns, whys = [], {}, {}
    for e in entries:
        module = check(cu.cuModuleLoadData(read_verified(Path(path), e)), f"cuModuleLoadData({e.cubin})")
        modules.append(module)
        fn = check(cu.cuModuleGetFunction(module, e.symbol.encode()), f"cuModuleGetFunction({e.symbol})")
        if e.dynamic_smem_bytes > 48 * 1024:
            check(cu.cuFuncSetAttribute(
                fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                e.dynamic_smem_bytes), "cuFuncSetAttribute")
        per_sm = check(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            fn, e.block[0] * e.block[1] * e.block[2], e.dynamic_smem_bytes), "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        why = coresidency_text(e, sms, per_sm, bool(coop))
        if why:
            whys[e.key] = why
        else:
            fns[e.key] = fn
    return modules, fns, whys


class PersistentKernels:
    """The persistent entries of a bundle loaded on one CUDA device (cuda-bindings, no TVM)."""

    def __init__(self, path, device: torch.device):
        from rnn_sparsify.codegen.manifest import Manifest

        from .cuda_loader import device_arch

        self.path, self.device = Path(path), device
        self.arch = device_arch(device)
        self.entries = [e for e in persistent_entries(Manifest.load(self.path)) if e.arch == self.arch]
        self._fn: dict = {}
        self._why: dict = {}
        if not self.entries:
            return
        self._modules, self._fn, self._why = load_cooperative(self.path, device, self.entries)

    def function(self, entry):
        """The driver function of ``entry``, or a str saying why it cannot run here."""
        return self._fn.get(entry.key) or self._why.get(entry.key, "entry not loaded")

    def launch(self, entry, fn, **bufs) -> None:
        """``cuLaunchCooperativeKernel`` on torch's current stream (the grid is then guaranteed
        co-resident, or the driver refuses the launch)."""
        import numpy as np

        from .cuda_loader import _driver, check

        cu = _driver()
        holders = []
        for p in entry.params:
            if p.pointer:
                holders.append(np.array([bufs[p.name].data_ptr()], dtype=np.uint64))
            else:  # the number of steps
                holders.append(np.array([bufs["Xg"].shape[0]], dtype=np.int32))
        params = np.array([h.ctypes.data for h in holders], dtype=np.uint64)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        check(cu.cuLaunchCooperativeKernel(fn, *entry.grid, *entry.block, entry.dynamic_smem_bytes,
                                           cu.CUstream(stream), params.ctypes.data),
              f"cuLaunchCooperativeKernel({entry.symbol})")
        del holders


def coresidency_text(entry, sms: int, per_sm: int, cooperative: bool) -> Optional[str]:
    """Why ``entry`` cannot be launched co-resident on a GPU with ``sms`` SMs where the
    occupancy API allows ``per_sm`` CTAs per SM (None: it can)."""
    grid = entry.grid[0] * entry.grid[1] * entry.grid[2]
    if not cooperative:
        return "the GPU does not support cooperative launches"
    if grid > sms * per_sm:
        return (f"{entry.symbol}: {grid} CTAs are not co-resident on this GPU ({sms} SMs x {per_sm} CTA(s) per SM "
                "by the occupancy API)")
    return None


def _kernels_for(device: torch.device):
    """The loaded kernels for ``device``, or a str saying why there are none (cached per
    device and bundle path)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    path = bundle_path()
    key = (idx, str(path))
    if key not in _loaded:
        if path is None:
            _loaded[key] = f"no kernel bundle in use (rnn_sparsify.kernels.persistent_eval.use_bundle or ${ENV_VAR})"
        else:
            try:
                _loaded[key] = PersistentKernels(path, torch.device("cuda", idx))
            except Exception as e:  # noqa: BLE001 - never an error: cuDNN runs instead
                _loaded[key] = f"bundle {path} not usable on cuda:{idx}: {type(e).__name__}: {e}"
                _warn_once(("load", path, idx), _loaded[key] + "; weight-sparse eval runs on nn.LSTM")
            else:
                if not _loaded[key].entries:
                    _loaded[key] = (f"bundle {path} has no persistent eval kernel for "
                                    f"{_loaded[key].arch} (build with `rnn-sparsify compile --persistent-eval`)")
    return _loaded[key]


def _weights_key(mod) -> tuple:
    ts = [p for p in mod._flat_weights if p is not None]
    return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in ts)


def _plan(mod, kernels, B: int, dtype: str):
    """Per (layer, direction): (entry, fn, Wv, Wc) — packed once per weight version and batch."""
    from rnn_sparsify.lstm_function import _layer_params

    key = (_weights_key(mod), B, dtype, id(kernels))
    cached = _CACHE.get(mod)
    if cached is not None and cached[0] == key:
        return cached[1]
    D = 2 if mod.bidirectional else 1
    # the entries this GPU can run first (co-resident grids: the occupancy API at load); if
    # none fits, the best of all of them, whose reason is then reported
    usable = [e for e in kernels.entries if not isinstance(kernels.function(e), str)]
    plan = {}
    for layer in range(mod.num_layers):
        for d in range(D):
            _, w_hh, _, _, _ = _layer_params(mod, layer, d)
            nnz = row_nnz_max(w_hh)
            entry = (choose_entry(usable, kernels.arch, mod.hidden_size, B, dtype, nnz)
                     or choose_entry(kernels.entries, kernels.arch, mod.hidden_size, B, dtype, nnz))
            if entry is None:
                return describe_missing(kernels.entries, kernels.arch, mod.hidden_size, B, dtype, nnz)
            fn = kernels.function(entry)
            if isinstance(fn, str):
                _warn_once(("cores", entry.key), fn + "; weight-sparse eval runs on nn.LSTM")
                return fn
            spec = PersistentSparseSpec.from_dict(entry.spec)
            plan[layer, d] = (entry, fn, *pack_ell(w_hh, spec), spec)
    _CACHE[mod] = (key, plan)
    return plan


# -- measured routing ----------------------------------------------------------------------

def _check_mode(mode, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r}: expected one of {', '.join(MODES)} (auto: time the persistent "
                         "kernels against nn.LSTM on the first call per shape and run the faster; always: the "
                         "kernels whenever they apply; never: nn.LSTM)")
    return mode


def set_eval_mode(mode: Optional[str]) -> None:
    """Routing of the persistent eval kernels for this process: ``"auto"`` | ``"always"`` |
    ``"never"``; None: ``$RNN_SPARSIFY_PERSISTENT_EVAL`` (default ``auto``). ValueError otherwise."""
    _config["mode"] = None if mode is None else _check_mode(mode, "set_eval_mode")


def eval_mode() -> str:
    """The routing mode in force: :func:`set_eval_mode`'s, else ``$RNN_SPARSIFY_PERSISTENT_EVAL``,
    else ``"auto"``. An unknown value raises ValueError saying which are valid."""
    if _config.get("mode"):
        return _config["mode"]
    env = os.environ.get(MODE_ENV_VAR)
    return "auto" if env in (None, "") else _check_mode(env, MODE_ENV_VAR)


@dataclass(frozen=True)
class RoutingVerdict:
    """What the first call for a key measured (milliseconds, medians) and which path runs."""

    persistent_ms: float
    dense_ms: float

    @property
    def persistent_wins(self) -> bool:
        return self.persistent_ms < self.dense_ms  # a tie: nn.LSTM (the safe path)

    @property
    def winner(self) -> str:
        return BACKEND if self.persistent_wins else DENSE

    def text(self) -> str:
        runs = "the persistent kernels run" if self.persistent_wins else "nn.LSTM runs"
        return (f"measured {self.persistent_ms:.3g} ms vs nn.LSTM {self.dense_ms:.3g} ms on this GPU at this "
                f"shape; {runs}")


_VERDICTS: dict = {}  # routing key -> RoutingVerdict (process-wide)


def routing_verdicts() -> dict:
    """The cached verdicts: ``{routing key: RoutingVerdict}`` (a copy)."""
    return dict(_VERDICTS)


def clear_routing() -> None:
    """Forget every verdict (the next call per key measures again)."""
    _VERDICTS.clear()


def _device_facts(device: torch.device) -> tuple:
    if device.type != "cuda":  # only when a test stands in for CUDA
        return (str(device),)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    p = torch.cuda.get_device_properties(idx)
    return (idx, p.name, p.multi_processor_count)


def routing_key(mod, x, kernels, plan) -> tuple:
    """What a verdict holds for: the GPU (index, name, SM count) and the bundle's arch, the input
    and hidden sizes, layers, direction, the input's layout (padded, or packed with its number
    of runs of equal batch = launches per layer and direction), batch, sequence length, dtype
    and the bundle entries (their content keys: the kernel's batch, grid, non-zero bound and
    build). ``x``: the padded (T, B, I) input, or the PackedSequence."""
    if isinstance(x, PackedSequence):
        data, T, B = x.data, len(x.batch_sizes), int(x.batch_sizes[0])
        layout = ("packed", len(_runs(x.batch_sizes)))
    else:
        data, (T, B, _) = x, x.shape
        layout = ("padded",)
    return (*_device_facts(data.device), kernels.arch, mod.input_size, mod.hidden_size, mod.num_layers,
            bool(mod.bidirectional), *layout, B, T, _DTYPES.get(data.dtype, str(data.dtype)),
            tuple(plan[k][0].key for k in sorted(plan)))


def _cuda_stopwatch(device):
    start = torch.cuda.Event(enable_timing=True)
    start.record()

    def stop() -> float:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return stop


def time_paths(paths: dict, device, *, repeats: int = TIMING_REPEATS, stopwatch=None) -> dict:
    """``{name: median ms}`` of the callables ``paths`` (``{name: fn}``): one untimed warm-up call
    each, then ``repeats`` interleaved rounds timed by ``stopwatch(device)`` (a start that
    returns ``stop() -> ms``; default: CUDA events on the current stream)."""
    stopwatch = stopwatch or _cuda_stopwatch
    for fn in paths.values():
        fn()
    times: dict = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            stop = stopwatch(device)
            fn()
            times[name].append(stop())
    return {name: statistics.median(ts) for name, ts in times.items()}


_timing: dict = {"timer": time_paths}


def set_timer(timer) -> None:
    """Replace the routing's timer: ``timer({name: fn}, device) -> {name: ms}`` with names
    ``BACKEND`` (the persistent kernels) and ``DENSE`` (``nn.LSTM.forward``); None: the default
    :func:`time_paths`. Tests drive the routing with fakes through this."""
    _timing["timer"] = timer or time_paths


def _routed(mod, input, hx, x, kernels, plan, run):
    """``(output or None, verdict)``: the persistent output (``run``: :func:`_run` or
    :func:`_run_packed`) when the (cached or now measured) verdict says the kernels are faster,
    else None (the caller runs nn.LSTM)."""
    key = routing_key(mod, x, kernels, plan)
    verdict = _VERDICTS.get(key)
    held = {}
    if verdict is None:
        def persistent():
            held["out"] = run(mod, x, hx, kernels, plan)
            return held["out"]

        def dense():
            return torch.nn.LSTM.forward(mod, input, hx)

        device = (input.data if isinstance(input, PackedSequence) else input).device
        ms = _timing["timer"]({BACKEND: persistent, DENSE: dense}, device)
        verdict = _VERDICTS[key] = RoutingVerdict(float(ms[BACKEND]), float(ms[DENSE]))
        if not verdict.persistent_wins:
            _warn_once(("slower", key), f"the sparse persistent eval kernels are slower than nn.LSTM here "
                       f"({verdict.text()}); set {MODE_ENV_VAR}=always to run them anyway")
    if not verdict.persistent_wins:
        return None, verdict
    return (held["out"] if "out" in held else run(mod, x, hx, kernels, plan)), verdict


def sparse_persistent_forward(mod, input, hx=None):
    """``nn.LSTM.forward`` on the persistent kernels, or None where they do not apply or are
    measured slower (the caller runs ``nn.LSTM.forward``); records ``mod.last_eval_backend`` /
    ``last_eval_reason`` and ``mod.last_eval_routing`` (the measured verdict's text, None when
    not measured: mode ``always``/``never`` or the kernels do not apply)."""
    mod.last_eval_routing = None
    why = why_not_static(mod, input, hx)
    if why is None:
        mode = eval_mode()
        packed = isinstance(input, PackedSequence)
        device = (input.data if packed else input).device  # a PackedSequence has no .device
        kernels = (f"{MODE_ENV_VAR}=never (the persistent kernels are switched off)" if mode == "never"
                   else _kernels_for(device))
        if isinstance(kernels, str):
            why = kernels
        else:
            x = input if packed else (input.transpose(0, 1) if mod.batch_first else input)
            B = int(input.batch_sizes[0]) if packed else x.shape[1]
            plan = _plan(mod, kernels, B, _DTYPES[(input.data if packed else x).dtype])
            if isinstance(plan, str):
                why = plan
            else:
                try:
                    run = _run_packed if packed else _run
                    if mode == "always":
                        out, verdict = run(mod, x, hx, kernels, plan), None
                    else:
                        out, verdict = _routed(mod, input, hx, x, kernels, plan, run)
                except BundleError as e:  # a refused launch: never an error, cuDNN runs instead
                    why = f"persistent kernel launch failed: {e}"
                    _warn_once(("launch", str(e)), why + "; weight-sparse eval runs on nn.LSTM")
                    _loaded[(device.index if device.index is not None
                             else torch.cuda.current_device(), str(bundle_path()))] = why
                else:
                    mod.last_eval_routing = None if verdict is None else verdict.text()
                    if out is not None:
                        mod.last_eval_backend = BACKEND
                        mod.last_eval_reason = "sparse persistent kernels" + (
                            f" ({mod.last_eval_routing})" if verdict is not None else "")
                        return out
                    why = mod.last_eval_routing
    mod.last_eval_backend, mod.last_eval_reason = DENSE, why
    return None


def _run(mod, x, hx, kernels, plan):
    from rnn_sparsify.lstm_function import _layer_params

    T, B, _ = x.shape
    H, L = mod.hidden_size, mod.num_layers
    D = 2 if mod.bidirectional else 1
    zeros = x.new_zeros(L * D, B, H)
    h0, c0 = hx if hx is not None else (zeros, zeros)
    hn, cn = torch.empty_like(zeros), torch.empty_like(zeros)
    layer_in = x
    for layer in range(L):
        outs = []
        for d in range(D):
            w_ih, _, b_ih, b_hh, _ = _layer_params(mod, layer, d)
            entry, fn, Wv, Wc, spec = plan[layer, d]
            xin = layer_in.flip(0) if d else layer_in
            xg = xin @ w_ih.t()  # the input projection of all steps: one GEMM (masked W_ih)
            if b_ih is not None:
                xg = xg + (b_ih + b_hh)
            out, hT, cT = layer_forward(xg, h0[layer * D + d], c0[layer * D + d], Wv, Wc, spec,
                                        lambda **bufs: kernels.launch(entry, fn, **bufs))
            outs.append(out.flip(0) if d else out)
            hn[layer * D + d], cn[layer * D + d] = hT, cT
        layer_in = outs[0] if D == 1 else torch.cat(outs, 2)
    out = layer_in.transpose(0, 1) if mod.batch_first else layer_in
    return out.contiguous(), (hn, cn)


def _runs(batch_sizes: Tensor) -> list[tuple[int, int, int]]:
    """``(t0, t1, b)``: the steps ``t0 <= t < t1`` of a packed sequence where ``b`` rows are active
    (``batch_sizes`` is non-increasing: one run per distinct sequence length)."""
    bs = batch_sizes.tolist()
    runs, t0 = [], 0
    for t in range(1, len(bs) + 1):
        if t == len(bs) or bs[t] != bs[t0]:
            runs.append((t0, t, bs[t0]))
            t0 = t
    return runs


def _run_packed(mod, packed, hx, kernels, plan):
    """``nn.LSTM.forward`` of a ``PackedSequence`` on the persistent kernels.

    In sorted order (``packed.sorted_indices``; ``hx`` and the returned state are in the
    caller's order, as ``nn.LSTM`` has them) each layer and direction runs one launch per run
    of steps with the same number of active rows (:func:`_runs`: at most one per distinct
    length) on the first ``b`` rows, carrying ``h``/``c`` from launch to launch. A row's state
    stops changing after its last step (forward), and the reverse direction starts a row from
    ``hx`` when its last step is reached, so every row sees exactly its own sequence."""
    from rnn_sparsify.lstm_function import _layer_params

    data, bs = packed.data, packed.batch_sizes
    si, ui = packed.sorted_indices, packed.unsorted_indices
    T, B = len(bs), int(bs[0])
    t_idx = torch.repeat_interleave(torch.arange(T), bs)
    b_idx = torch.arange(len(t_idx)) - (torch.cumsum(bs, 0) - bs)[t_idx]
    flat = (t_idx * B + b_idx).to(data.device)  # packed row -> (t, b) of the padded sorted batch
    runs = _runs(bs)
    H, L = mod.hidden_size, mod.num_layers
    D = 2 if mod.bidirectional else 1
    if hx is not None:
        h0, c0 = hx
        if si is not None:
            h0, c0 = h0.index_select(1, si), c0.index_select(1, si)
    else:
        h0 = c0 = data.new_zeros(L * D, B, H)
    hn, cn = data.new_empty(L * D, B, H), data.new_empty(L * D, B, H)
    layer_in = data
    for layer in range(L):
        x = data.new_zeros(T * B, layer_in.shape[1])
        x[flat] = layer_in
        x = x.view(T, B, -1)
        outs = []
        for d in range(D):
            w_ih, _, b_ih, b_hh, _ = _layer_params(mod, layer, d)
            entry, fn, Wv, Wc, spec = plan[layer, d]
            xg = x @ w_ih.t()
            if b_ih is not None:
                xg = xg + (b_ih + b_hh)
            h, c = h0[layer * D + d].clone(), c0[layer * D + d].clone()
            out = xg.new_zeros(T, B, H)
            for t0, t1, b in (reversed(runs) if d else runs):
                seg = xg[t0:t1, :b].flip(0) if d else xg[t0:t1, :b]
                o, hT, cT = layer_forward(seg, h[:b], c[:b], Wv, Wc, spec,
                                          lambda **bufs: kernels.launch(entry, fn, **bufs))
                out[t0:t1, :b] = o.flip(0) if d else o
                h[:b], c[:b] = hT, cT
            outs.append(out)
            hn[layer * D + d], cn[layer * D + d] = h, c
        layer_in = (outs[0] if D == 1 else torch.cat(outs, 2)).reshape(T * B, D * H)[flat]
    if ui is not None:
        hn, cn = hn.index_select(1, ui), cn.index_select(1, ui)
    return PackedSequence(layer_in, bs, si, ui), (hn, cn)


__all__ = ["BACKEND", "MODES", "MODE_ENV_VAR", "RoutingVerdict", "bank_aware_order", "choose_entry", "clear_routing",
           "eval_mode", "h_slots", "h_wavefronts", "layer_forward", "pack_ell", "pack_words", "routing_key",
           "routing_verdicts", "row_nnz_max", "set_eval_mode", "set_timer", "sparse_persistent_forward", "time_paths",
           "unpack_ell", "unpack_words", "use_bundle", "why_not_module", "why_not_static"]
