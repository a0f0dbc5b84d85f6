"""Load and launch precompiled kernel bundles with the CUDA driver API -- no TVM at run time.

A bundle (written by ``rnn-sparsify compile``, see :mod:`rnn_sparsify.codegen.manifest`) holds
cubins, PTX and a manifest. :class:`LoadedBundle` checks it against the GPU (arch, file hashes),
loads the cubins with ``cuda-bindings`` (``cuModuleLoadData``) into PyTorch's context, and
launches kernels on PyTorch's current stream with torch tensors as arguments. Every driver
call is checked; failures raise :class:`~rnn_sparsify.codegen.errors.BundleError` with the
driver's message (the backend turns that into a fallback to the reference path).

Needs only ``torch``, ``numpy`` and ``cuda-bindings`` (``pip install 'rnn-sparsify[gpu]'``;
its major version must be supported by the installed driver).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnn_sparsify.codegen.errors import BundleError
from rnn_sparsify.codegen.gemm_gather import problem_key, spec_from_dict
from rnn_sparsify.codegen.manifest import KernelEntry, Manifest, read_verified
from rnn_sparsify.codegen.persistent_sparse import KIND as PERSISTENT_EVAL_KIND
from rnn_sparsify.codegen.persistent_train import KINDS as PERSISTENT_TRAIN_KINDS

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                 "int32": torch.int32, "int64": torch.int64}


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise BundleError(
            "cuda-bindings is needed to launch precompiled kernels: pip install 'rnn-sparsify[gpu]' "
            f"(or the cuda-bindings wheel matching the driver's CUDA major version) ({e})"
        ) from e
    return driver


def check(result: Any, what: str = "CUDA call"):
    """Unwrap a cuda-bindings result tuple ``(CUresult, *values)``; raise on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", None) or f"CUresult {int(err)}"
        try:  # the message needs the driver library; the enum name does not
            _, msg = _driver().cuGetErrorString(err)
            msg = msg.decode() if msg else ""
        except Exception:  # noqa: BLE001 - best effort: keep the original error visible
            msg = ""
        raise BundleError(f"{what} failed: {name}{': ' + msg if msg else ''}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _arch_num(arch: str) -> int:
    return int("".join(c for c in arch if c.isdigit()))


_NOT_GEMMS = (PERSISTENT_EVAL_KIND, *PERSISTENT_TRAIN_KINDS)


def choose_entries(manifest: Manifest, arch: str, *, allow_ptx_jit: bool = False, where: str = "bundle") -> list[tuple[KernelEntry, bool]]:
    """The entries to load on a GPU of ``arch``: ``(entry, from_ptx)``.

    Exact-arch cubins; else, with ``allow_ptx_jit``, the newest older-arch PTX of each kernel
    (the driver JIT-compiles it); else :class:`BundleError` naming the archs and the fix.
    Sparse persistent eval and persistent training entries are not GEMMs: skipped here (a
    bundle of only those: none).
    """
    # loaded by .persistent_eval / .persistent_train, not as GEMMs
    gemms = [e for e in manifest.kernels if e.spec.get("kind") not in _NOT_GEMMS]
    if not gemms:
        return []
    exact = [e for e in gemms if e.arch == arch]
    if exact:
        return [(e, False) for e in exact]
    if allow_ptx_jit:
        best: dict[tuple, KernelEntry] = {}
        for e in gemms:
            if e.ptx and _arch_num(e.arch) <= _arch_num(arch):
                k = problem_key(e.spec)
                if k not in best or _arch_num(e.arch) > _arch_num(best[k].arch):
                    best[k] = e
        if best:
            return [(e, True) for e in best.values()]
    raise BundleError(
        f"{where} was built for {sorted(set(manifest.archs))}, this GPU is {arch}: rebuild it with "
        f"`rnn-sparsify compile ... --arch {arch}`"
        + ("" if allow_ptx_jit else " (or load it with allow_ptx_jit=True to JIT an older arch's PTX)")
    )


@dataclass
class Kernel:
    """One launchable kernel: its manifest entry, spec, buffer shapes and driver function."""

    entry: KernelEntry
    function: Any
    from_ptx: bool = False

    def __post_init__(self) -> None:
        self.spec = spec_from_dict(self.entry.spec)
        self.shapes = {n: (tuple(s), dt) for n, s, dt in self.spec.params()}

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shapes["C"][0]


class LoadedBundle:
    """A bundle loaded for one CUDA device.

    ``allow_ptx_jit``: when the bundle has no cubin for this GPU's arch, JIT-compile the PTX of
    an older arch (forward compatibility). Off by default: a bundle built for another arch is
    refused with a message that says how to rebuild it.
    """

    def __init__(self, path: str | Path, device: torch.device | int | str | None = None, *, allow_ptx_jit: bool = False):
        self.path = Path(path)
        self.manifest = Manifest.load(self.path)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BundleError(f"kernel bundles run on CUDA devices, not {self.device}")
        self.arch = device_arch(self.device)
        chosen = choose_entries(self.manifest, self.arch, allow_ptx_jit=allow_ptx_jit, where=str(self.path))
        self.kernels: dict[tuple, Kernel] = {}
        self._modules: list[Any] = []
        self._load(chosen)

    # -- loading ---------------------------------------------------------------------
    def _context(self):
        cu = _driver()
        torch.cuda.init()
        with torch.cuda.device(self.device):
            torch.empty(1, device=self.device)  # makes torch's (primary) context current
        check(cu.cuInit(0), "cuInit")
        dev = check(cu.cuDeviceGet(self.device.index or 0), "cuDeviceGet")
        ctx = check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        return cu

    def _load(self, chosen: list[tuple[KernelEntry, bool]]) -> None:
        cu = self._context()
        for entry, use_ptx in chosen:
            data = read_verified(self.path, entry, ptx=use_ptx)
            if use_ptx:
                data = data + b"\0"
            module = check(cu.cuModuleLoadData(data), f"cuModuleLoadData({entry.cubin if not use_ptx else entry.ptx})")
            self._modules.append(module)
            fn = check(cu.cuModuleGetFunction(module, entry.symbol.encode()), f"cuModuleGetFunction({entry.symbol})")
            if entry.dynamic_smem_bytes > 48 * 1024:
                check(
                    cu.cuFuncSetAttribute(
                        fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        entry.dynamic_smem_bytes,
                    ),
                    "cuFuncSetAttribute",
                )
            self.kernels[problem_key(entry.spec)] = Kernel(entry, fn, use_ptx)

    def dtypes(self) -> set[str]:
        return {k.entry.spec["dtype"] for k in self.kernels.values()}

    def find(self, spec_dict: dict[str, Any]) -> Kernel | None:
        return self.kernels.get(problem_key(spec_dict))

    # -- launching -------------------------------------------------------------------
    def launch(self, kernel: Kernel, args: dict[str, torch.Tensor]) -> None:
        """Launch ``kernel`` on the current stream; ``args`` maps buffer names to tensors.

        Checks every argument's device, dtype, shape and contiguity against the spec (a
        kernel reads raw pointers: a wrong tensor must never reach it).
        """
        cu = _driver()
        entry = kernel.entry
        shapes = kernel.shapes
        holders = []
        for p in entry.params:
            t = args.get(p.name)
            if t is None:
                raise BundleError(f"{entry.symbol}: missing argument {p.name!r}")
            shape, dt = shapes[p.name]
            if t.device != self.device:
                raise BundleError(f"{entry.symbol}: {p.name} is on {t.device}, the kernel on {self.device}")
            if t.dtype != _TORCH_DTYPES[dt] or tuple(t.shape) != shape or not t.is_contiguous():
                raise BundleError(
                    f"{entry.symbol}: {p.name} must be a contiguous {dt} tensor of shape {shape}, "
                    f"got {t.dtype} {tuple(t.shape)} contiguous={t.is_contiguous()}"
                )
            holders.append(np.array([t.data_ptr()], dtype=np.uint64))
        params = np.array([h.ctypes.data for h in holders], dtype=np.uint64)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        gx, gy, gz = entry.grid
        bx, by, bz = entry.block
        check(
            cu.cuLaunchKernel(
                kernel.function, gx, gy, gz, bx, by, bz, entry.dynamic_smem_bytes,
                cu.CUstream(stream), params.ctypes.data, 0,
            ),
            f"cuLaunchKernel({entry.symbol})",
        )
        del holders  # the driver copied the argument values at launch
