"""GPU backend on precompiled TVM kernels (no TVM at run time), registered as a backend rule.

Enable it with a bundle built by ``rnn-sparsify compile``::

    from rnn_sparsify.kernels import cuda_backend
    cuda_backend.use_bundle("bundles/ptb")          # or: export RNN_SPARSIFY_KERNELS=bundles/ptb

Then :func:`rnn_sparsify.kernels.select_backend` returns a :class:`CudaKernelBackend` for CUDA
devices whose arch the bundle was built for. Each GEMM method takes the generated kernel when
the bundle has one for the call's exact problem (kind, sizes, dtype) and otherwise calls the
reference method (``super()``): a missing kernel is never an error. ``backend.paths`` counts,
per method, which path ran (``"kernel"`` or ``"reference: <reason>"``); :func:`explain` says
ahead of a run which path each GEMM of an LSTM will take.

Kernel wrappers check, allocate, launch: they check operands (device, dtype, contiguity),
allocate the padded fp32 product, launch on the current stream (a split-K kernel's partials
are summed), then return the logical view cast to the input dtype (alpha folded in), exactly
like the reference methods.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from rnn_sparsify.codegen.errors import BundleError, CodegenError
from rnn_sparsify.codegen.gemm_gather import BlockRowsData, BlockRowsWgrad, GatherK, GatherKN, GatherRowsT, WgradT

from . import register_backend_rule, unregister_backend_rule
from .reference import ReferenceBackend

ENV_VAR = "RNN_SPARSIFY_KERNELS"
RULE_NAME = "tvm_cuda"
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


# Sequence weight gradients with per-step masks: "masked_dense" (default) runs one dense GEMM
# over all T*B rows of the masked operands; "kernel" runs the generated per-step WgradT kernel
# and scatters its T products into dW. By the traffic model in docs/codegen.md ("Known limits")
# the scatter moves T times the output of the dense GEMM (141 MB per call at 2x650/B20), so the
# dense GEMM on masked operands is expected to be faster at batch 20-64 until the GPU run
# measures both (``codegen.bench`` times each; set the variable to compare).
WGRAD_ENV_VAR = "RNN_SPARSIFY_CUDA_WGRAD"
WGRAD_STRATEGIES = ("masked_dense", "kernel")


def masked_dense_wgrad(g: Tensor, g_cols: Tensor | None, x: Tensor, x_idx: Tensor | None, out: Tensor,
                       alpha: float = 1.0) -> None:
    """``ReferenceBackend.wgrad`` as one dense GEMM: for every t,
    ``out[g_cols[t]][:, x_idx[t]] += alpha * g[t].T @ x[t][:, x_idx[t]]`` equals
    ``out += alpha * sum_t G_t.T @ X_t`` with ``G_t`` = ``g[t]`` scattered into its kept columns of
    a zero ``(B, N)`` and ``X_t`` = ``x[t]`` with the dropped columns zeroed (a zero row or
    column adds nothing). Kept indices must be distinct within a step (they are: kept sets).
    The GEMM runs in ``out``'s dtype (fp32 accumulation like the kernels)."""
    T, B, kc = g.shape
    N, K = out.shape
    if g_cols is not None:
        cols = g_cols.expand(T, -1) if g_cols.dim() == 1 else g_cols
        gd = g.new_zeros(T, B, N).scatter_(2, cols[:, None, :].expand(T, B, kc), g)
    else:
        gd = g
    if x_idx is not None:
        idx = (x_idx.expand(T, -1) if x_idx.dim() == 1 else x_idx)[:, None, :].expand(T, B, -1)
        xd = x.new_zeros(T, B, K).scatter_(2, idx, x.gather(2, idx))
    else:
        xd = x
    out.addmm_(gd.reshape(T * B, N).t().to(out.dtype), xd.reshape(T * B, K).to(out.dtype), alpha=alpha)


def rows_operands(x: Tensor, w: Tensor, idx: Tensor, padded: tuple[int, int, int]) -> dict[str, Tensor]:
    """The operands of a :class:`GatherRowsT` kernel (``padded`` = its ``(Np, Mp, Kp)``) for
    ``fwd_input(x, w, idx)``: ``Wt`` = ``w.T`` zero-padded to ``Np`` columns plus the zero row
    ``K``, ``Xt[t]`` = ``x[t].T`` zero-padded to ``Mp`` columns plus the zero row ``K``, ``idx``
    padded with ``K`` (rows past the kept count read the zero rows).

    ``Wt`` is rebuilt at every call (one transposing copy of the weight, like the CPU backend's
    ``W^T``): a cache keyed on the version counter would miss ``.data`` writes (an optimizer's
    ``p.data.add_``), one keyed on ``data_ptr`` would hand a new tensor at a reused address the
    old values; the copy is one pass over ``w`` per call, against ``T`` steps of GEMM on it."""
    Np, Mp, Kp = padded
    T, B, K = x.shape
    N, k = w.shape[0], idx.shape[-1]
    wt = w.new_zeros(K + 1, Np)
    wt[:K, :N] = w.detach().t()
    xt = x.new_zeros(T, K + 1, Mp)
    xt[:, :K, :B] = x.transpose(1, 2)
    ip = torch.full((T, Kp), K, dtype=torch.int32, device=x.device)
    ip[:, :k] = idx.expand(T, -1) if idx.dim() == 1 else idx
    return {"Wt": wt, "Xt": xt, "idx": ip}


def block_offsets(idx: Tensor, P: int) -> Tensor:
    """Kept element indices in runs of ``P`` starting at multiples of ``P`` -> block numbers:
    ``(..., k) -> (..., k / P)``. The run structure is the caller's contract (coarse gate
    slices, see :meth:`ReferenceBackend.bwd_data`); it is not re-checked here (that would
    synchronize the GPU)."""
    return idx.reshape(*idx.shape[:-1], -1, P)[..., 0] // P


class CudaKernelBackend(ReferenceBackend):
    """Generated tensor-core kernels for the GEMMs in the bundle; reference for the rest."""

    name = "tvm_cuda"

    def __init__(self, bundle, *, wgrad_strategy: str | None = None):
        self.bundle = bundle  # a cuda_loader.LoadedBundle
        self.paths: dict[str, Counter] = defaultdict(Counter)
        self.wgrad_strategy = wgrad_strategy or os.environ.get(WGRAD_ENV_VAR, "masked_dense")
        if self.wgrad_strategy not in WGRAD_STRATEGIES:
            raise ValueError(f"{WGRAD_ENV_VAR}={self.wgrad_strategy!r}: expected one of {', '.join(WGRAD_STRATEGIES)}")

    # -- lookup / bookkeeping ----------------------------------------------------------
    def _kernel(self, method: str, make_spec, tensors: tuple[Tensor, ...]):
        """The kernel for this call, or ``None`` (recorded with the reason).

        ``make_spec(dtype_name)`` returns the spec, or a sequence of candidate specs in order of
        preference (the first one the bundle has wins; one that no generator takes is skipped).
        Returns the kernel, or ``(kernel, candidate position)`` for a sequence.
        """
        dt = tensors[0].dtype
        if any(t.device != self.bundle.device for t in tensors):
            self.paths[method]["reference: operand on another device"] += 1
            return None
        if dt not in _DTYPE_NAMES or any(t.dtype != dt for t in tensors):
            self.paths[method]["reference: dtype"] += 1
            return None
        makers = make_spec if isinstance(make_spec, (list, tuple)) else (make_spec,)
        specs = []
        for i, make in enumerate(makers):
            try:
                specs.append((i, make(_DTYPE_NAMES[dt])))
            except CodegenError:
                continue
        if not specs:
            self.paths[method]["reference: no generator for this shape"] += 1
            return None
        for i, spec in specs:
            kernel = self.bundle.find(spec.to_dict())
            if kernel is not None:
                self.paths[method]["kernel"] += 1
                return (kernel, i) if makers is make_spec else kernel
        self.paths[method]["reference: no kernel in bundle for this shape"] += 1
        return None

    @staticmethod
    def _idx(idx: Tensor, T: int) -> Tensor:
        """int32, contiguous, one row per step: (T, k)."""
        if idx.dim() == 1:
            idx = idx.unsqueeze(0).expand(T, -1)
        return idx.to(torch.int32).contiguous()

    def _run(self, kernel, **args: Tensor) -> Tensor:
        """Launch; the padded fp32 product ``(T, Mp, Np)``. A split-K kernel (``Tile.split_k`` =
        S > 1) writes ``(T * S, Mp, Np)`` partials (row ``t * S + s``): summed here over ``s``
        in fp32 (one torch reduction; deterministic, no atomics)."""
        out = torch.empty(kernel.out_shape, device=self.bundle.device, dtype=torch.float32)
        args = {k: v.contiguous() for k, v in args.items()}
        self.bundle.launch(kernel, {**args, "C": out})
        S = kernel.spec.tile.split_k
        if S > 1:
            out = out.view(-1, S, *out.shape[1:]).sum(1)
        return out

    @staticmethod
    def _finish(C: Tensor, M: int, N: int, alpha: float, dtype: torch.dtype) -> Tensor:
        out = C[:, :M, :N]
        if alpha != 1.0:
            out = out * alpha
        return out.to(dtype).contiguous()

    # -- forward ---------------------------------------------------------------------
    def fwd_input(self, x: Tensor, w: Tensor, idx: Tensor | None, alpha: float = 1.0) -> Tensor:
        if idx is None or x.dim() != 3 or idx.dim() != 2:
            self.paths["fwd_input"]["reference: dense or unsupported rank"] += 1
            return super().fwd_input(x, w, idx, alpha)
        T, B, K = x.shape
        N, k = w.shape[0], idx.shape[1]
        # the whole-row kernel (transposed operands, cp.async) first, then GatherK (bundles
        # built before it, float32)
        found = self._kernel("fwd_input", [lambda dt: GatherRowsT(T=T, M=B, N=N, K=K, k=k, dtype=dt),
                                           lambda dt: GatherK(T=T, M=B, N=N, K=K, k=k, dtype=dt)], (x, w))
        if found is None:
            return super().fwd_input(x, w, idx, alpha)
        kern, which = found
        if which == 0:  # C[t] is the transposed product (Np, Mp)
            C = self._run(kern, **rows_operands(x, w, idx, kern.spec.padded))
            return self._finish(C.transpose(1, 2), B, N, alpha, x.dtype)
        C = self._run(kern, A=x, W=w, idx=self._idx(idx, T))
        return self._finish(C, B, N, alpha, x.dtype)

    def fwd_recurrent(self, h: Tensor, w: Tensor, idx: Tensor | None, alpha: float = 1.0) -> Tensor:
        if idx is None or h.dim() != 2 or idx.dim() != 1:
            self.paths["fwd_recurrent"]["reference: dense or unsupported rank"] += 1
            return super().fwd_recurrent(h, w, idx, alpha)
        B, K = h.shape
        N, k = w.shape[0], idx.shape[0]
        kern = self._kernel("fwd_recurrent", lambda dt: GatherK(T=1, M=B, N=N, K=K, k=k, dtype=dt), (h, w))
        if kern is None:
            return super().fwd_recurrent(h, w, idx, alpha)
        C = self._run(kern, A=h.unsqueeze(0), W=w, idx=self._idx(idx, 1))
        return self._finish(C, B, N, alpha, h.dtype)[0]

    # -- backward-data ---------------------------------------------------------------
    def bwd_data(self, g, g_cols, w, out_idx, alpha: float = 1.0, block: int = 1):
        ref = super().bwd_data
        if (g_cols is None and out_idx is None) or g.dim() not in (2, 3):
            self.paths["bwd_data"]["reference: dense or unsupported rank"] += 1
            return ref(g, g_cols, w, out_idx, alpha, block)
        batched = g.dim() == 3
        T = g.shape[0] if batched else 1
        M, kc = g.shape[-2:]
        for ix in (g_cols, out_idx):
            if ix is not None and (ix.dim() > (2 if batched else 1) or (ix.dim() == 2 and ix.shape[0] != T)):
                self.paths["bwd_data"]["reference: index rank"] += 1
                return ref(g, g_cols, w, out_idx, alpha, block)
        Nw, Kw = w.shape
        kn = None if out_idx is None else out_idx.shape[-1]
        kcs = None if g_cols is None else kc

        def spec(P):
            return lambda dt: GatherKN(T=T, M=M, Nw=Nw, Kw=Kw, kc=kcs, kn=kn, dtype=dt, P=P)

        # coarse gate slices: the kernel over kept blocks of ``block`` rows of W first (a
        # bundle built for the config has it), then the one over single rows
        blocked = g_cols is not None and block > 1
        found = self._kernel("bwd_data", [spec(block), spec(1)] if blocked else [spec(1)], (g, w))
        if found is None:
            return ref(g, g_cols, w, out_idx, alpha, block)
        kern, which = found
        args = {"G": g if batched else g.unsqueeze(0), "W": w}
        if g_cols is not None:
            if blocked and which == 0:
                args["rows"] = self._idx(block_offsets(g_cols, block), T)
            else:
                args["rows"] = self._idx(g_cols, T)
        if out_idx is not None:
            args["cols"] = self._idx(out_idx, T)
        C = self._run(kern, **args)
        out = self._finish(C, M, Kw if kn is None else kn, alpha, g.dtype)
        return out if batched else out[0]

    # -- weight gradient -------------------------------------------------------------
    def wgrad(self, g, g_cols, x, x_idx, out, alpha: float = 1.0, block: int = 1) -> None:
        ref = super().wgrad
        if (g_cols is None and x_idx is None) or g.dim() != 3 or x.dim() != 3:
            self.paths["wgrad"]["reference: dense or unsupported rank"] += 1
            return ref(g, g_cols, x, x_idx, out, alpha, block)
        if self.wgrad_strategy == "masked_dense":
            self.paths["wgrad"]["masked dense GEMM"] += 1
            return masked_dense_wgrad(g, g_cols, x, x_idx, out, alpha)
        T, B, kc = g.shape
        K = x.shape[2]
        k = None if x_idx is None else x_idx.shape[-1]
        # the kernel never reads g_cols (G holds the kept columns, the product is scattered to
        # rows g_cols below), so ``block`` does not change it
        kern = self._kernel("wgrad", lambda dt: WgradT(T=T, B=B, kc=kc, K=K, k=k, dtype=dt), (g, x))
        if kern is None:
            return ref(g, g_cols, x, x_idx, out, alpha, block)
        args = {"G": g, "X": x}
        if x_idx is not None:
            args["idx"] = self._idx(x_idx, T)
        C = self._run(kern, **args)
        prod = C[:, :kc, : (K if k is None else k)]
        if alpha != 1.0:
            prod = prod * alpha
        dev = g.device
        rows = g_cols if g_cols is not None else torch.arange(out.shape[0], device=dev).expand(T, -1)
        cols = x_idx if x_idx is not None else torch.arange(out.shape[1], device=dev).expand(T, -1)
        if rows.dim() == 1:
            rows = rows.expand(T, -1)
        if cols.dim() == 1:
            cols = cols.expand(T, -1)
        out.index_put_((rows[:, :, None], cols[:, None, :]), prod.to(out.dtype), accumulate=True)

    # -- fine-grained (block-row sparse) gate gradients --------------------------------
    # The methods get row numbers, not the block height My: the kernels index at row
    # granularity (spec My = 1), exact for kept blocks of any height (see lstm_spec.fine_rows).
    def _blockrows_args(self, vals: Tensor, idx: Tensor | None) -> dict[str, Tensor]:
        S, r, Mx = vals.shape
        args = {"V": vals if r else vals.new_zeros(S, 1, Mx)}  # empty selection: a dummy row
        if idx is not None:
            cols = idx.to(torch.int32).reshape(1, -1)
            args["cols"] = cols if cols.shape[1] else cols.new_zeros(1, 1)
        return args

    @staticmethod
    def _blockrows_shapes_ok(vals: Tensor, rows: Tensor, idx: Tensor | None) -> bool:
        return (vals.dim() == 3 and rows.shape == vals.shape[:2]
                and (idx is None or idx.dim() == 1))

    def bwd_data_blockrows(self, vals, rows, w, out_idx, n_rows: int, alpha: float = 1.0):
        ref = super().bwd_data_blockrows
        if not self._blockrows_shapes_ok(vals, rows, out_idx) or w.shape[0] != vals.shape[0] * vals.shape[2]:
            self.paths["bwd_data_blockrows"]["reference: unsupported rank or shape"] += 1
            return ref(vals, rows, w, out_idx, n_rows, alpha)
        S, r, Mx = vals.shape
        K = w.shape[1]
        k = None if out_idx is None else out_idx.shape[0]
        kern = self._kernel(
            "bwd_data_blockrows",
            lambda dt: BlockRowsData(S=S, Mx=Mx, My=1, nb=n_rows, kb=r, K=K, k=k, dtype=dt), (vals, w),
        )
        if kern is None:
            return ref(vals, rows, w, out_idx, n_rows, alpha)
        # inverse map: pos[s, row] = position of ``row`` among slice s's kept rows, -1 if dropped
        pos = torch.full((S, n_rows), -1, dtype=torch.int32, device=vals.device)
        pos.scatter_(1, rows, torch.arange(r, dtype=torch.int32, device=vals.device).expand(S, r))
        C = self._run(kern, W=w, pos=pos, **self._blockrows_args(vals, out_idx))
        return self._finish(C, n_rows, K if k is None else k, alpha, vals.dtype)[0]

    def wgrad_blockrows(self, vals, rows, x, x_idx, out, alpha: float = 1.0) -> None:
        ref = super().wgrad_blockrows
        if (not self._blockrows_shapes_ok(vals, rows, x_idx) or x.dim() != 2
                or out.shape != (vals.shape[0] * vals.shape[2], x.shape[1])):
            self.paths["wgrad_blockrows"]["reference: unsupported rank or shape"] += 1
            return ref(vals, rows, x, x_idx, out, alpha)
        S, r, Mx = vals.shape
        n_rows, K = x.shape
        k = None if x_idx is None else x_idx.shape[0]
        kern = self._kernel(
            "wgrad_blockrows",
            lambda dt: BlockRowsWgrad(S=S, Mx=Mx, My=1, kb=r, n_rows=n_rows, K=K, k=k, dtype=dt), (vals, x),
        )
        if kern is None:
            return ref(vals, rows, x, x_idx, out, alpha)
        rows32 = rows.to(torch.int32) if r else rows.new_zeros(S, 1, dtype=torch.int32)
        C = self._run(kern, X=x, rows=rows32, **self._blockrows_args(vals, x_idx))
        prod = C[:, :Mx, : (K if k is None else k)]
        if alpha != 1.0:
            prod = prod * alpha
        view = out.view(S, Mx, K)
        if x_idx is None:
            view.add_(prod.to(out.dtype))
        else:
            view[:, :, x_idx] += prod.to(out.dtype)

    # -- reporting -------------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, int]]:
        return {m: dict(c) for m, c in self.paths.items()}


# -- configuration and the backend rule ------------------------------------------------
_lock = threading.Lock()
_config: dict[str, object] = {"path": None, "allow_ptx_jit": False}
_loaded: dict[int, object] = {}  # device index -> CudaKernelBackend or the load error
_errors: dict[int, str] = {}


def use_bundle(path: str | os.PathLike | None, *, allow_ptx_jit: bool = False) -> None:
    """Use the kernel bundle at ``path`` on CUDA devices (``None``: stop using generated kernels).

    The bundle is loaded and checked lazily, on the first backend selection for each device;
    if it cannot be used there (other arch, hash mismatch, no cuda-bindings) the reference
    backend is selected and :func:`load_errors` says why.
    """
    with _lock:
        _loaded.clear()
        _errors.clear()
        if path is None:
            _config["path"] = None
            unregister_backend_rule(RULE_NAME)
            return
        p = Path(path)
        if not (p / "manifest.json").is_file():
            raise BundleError(f"{p} is not a kernel bundle (no manifest.json); build one with `rnn-sparsify compile`")
        _config.update(path=p, allow_ptx_jit=allow_ptx_jit)
        register_backend_rule(RULE_NAME, _rule)


def load_errors() -> dict[int, str]:
    """Why the bundle could not be used, per CUDA device index."""
    return dict(_errors)


def backend_for(device: torch.device) -> Optional[CudaKernelBackend]:
    """The loaded backend of ``device`` (``None`` when no bundle is configured or it failed)."""
    if _config["path"] is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _loaded:
            from .cuda_loader import LoadedBundle

            try:
                bundle = LoadedBundle(_config["path"], torch.device("cuda", index),
                                      allow_ptx_jit=bool(_config["allow_ptx_jit"]))
                _loaded[index] = CudaKernelBackend(bundle)
            except (BundleError, OSError, RuntimeError) as e:
                _loaded[index] = None
                _errors[index] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"rnn_sparsify: kernel bundle {_config['path']} not used on cuda:{index}, "
                    f"falling back to the reference kernels: {e}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _loaded[index]


def _rule(device: torch.device, dtype: torch.dtype):
    backend = backend_for(device)
    if backend is None or _DTYPE_NAMES.get(dtype) not in backend.bundle.dtypes():
        return None
    return backend


def explain(lstm_spec, device: torch.device | None = None) -> list[dict[str, str]]:
    """Which path each GEMM of ``lstm_spec`` (an :class:`~rnn_sparsify.codegen.lstm_spec.LSTMSpec`)
    will take on ``device``: ``kernel <symbol>`` or ``reference (<reason>)``."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    backend = backend_for(device) if device.type == "cuda" else None
    rows = []
    for method, spec in lstm_spec.gemms():
        if backend is None:
            reason = "no CUDA device" if device.type != "cuda" else (
                _errors.get(device.index or 0) or "no bundle configured")
            path = f"reference ({reason})"
        else:
            k = backend.bundle.find(spec.to_dict())
            path = f"kernel {k.entry.symbol}" if k else "reference (no kernel in bundle for this shape)"
        rows.append({"lstm": lstm_spec.name, "method": method, "gemm": repr(spec), "path": path})
    return rows

