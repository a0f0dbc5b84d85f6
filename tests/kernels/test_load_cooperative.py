"""``persistent_eval.load_cooperative`` (the cubin loading of both persistent kernel families)
against a fake cuda-bindings driver: the GPU-only code path runs on the CPU, so a refactor
that drops a call or mixes up the co-residency verdicts fails here, not first on a GPU."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from rnn_sparsify.kernels import cuda_loader
from rnn_sparsify.kernels import persistent_eval as pe


class FakeDriver:
    CUdevice_attribute = SimpleNamespace(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT="sms",
                                         CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH="coop")
    CUfunction_attribute = SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="maxsmem")

    def __init__(self, sms=132, coop=1, per_sm=1):
        self.calls, self.sms, self.coop, self.per_sm = [], sms, coop, per_sm

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            value = {"cuDeviceGetAttribute": lambda: self.sms if args[0] == "sms" else self.coop,
                     "cuModuleLoadData": lambda: f"module:{args[0]!r}",
                     "cuModuleGetFunction": lambda: f"fn:{args[1].decode()}",
                     "cuOccupancyMaxActiveBlocksPerMultiprocessor": lambda: self.per_sm,
                     }.get(name, lambda: "handle")()
            return (0, value) if name not in ("cuInit", "cuCtxSetCurrent", "cuFuncSetAttribute") else (0,)
        return call


def _entry(symbol, grid, smem):
    return SimpleNamespace(key=symbol + "-key", symbol=symbol, cubin=symbol + ".cubin", grid=(grid, 1, 1),
                           block=(256, 1, 1), dynamic_smem_bytes=smem)


def _patch(monkeypatch, drv):
    monkeypatch.setattr(cuda_loader, "_driver", lambda: drv)
    fake_torch = SimpleNamespace(cuda=SimpleNamespace(init=lambda: None, device=lambda d: contextlib.nullcontext()),
                                 empty=lambda *a, **k: None)
    monkeypatch.setattr(pe, "torch", fake_torch)
    import rnn_sparsify.codegen.manifest as manifest

    monkeypatch.setattr(manifest, "read_verified", lambda folder, e, **k: e.cubin.encode())


def test_co_resident_entries_get_functions_and_the_others_a_reason(monkeypatch):
    drv = FakeDriver(sms=132, per_sm=1)
    _patch(monkeypatch, drv)
    small, big = _entry("small_kernel", 128, 40 * 1024), _entry("big_kernel", 140, 100 * 1024)
    modules, fns, whys = pe.load_cooperative("/bundle", torch.device("cuda", 0), [small, big])
    assert modules == ["module:b'small_kernel.cubin'", "module:b'big_kernel.cubin'"]
    assert fns == {"small_kernel-key": "fn:small_kernel"}
    assert set(whys) == {"big_kernel-key"} and "140 CTAs are not co-resident" in whys["big_kernel-key"]
    names = [c[0] for c in drv.calls]
    assert names[:3] == ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain"]
    # the >48 KB dynamic shared memory opt-in only for the kernel that needs it, before its occupancy query
    smem = [c for c in drv.calls if c[0] == "cuFuncSetAttribute"]
    assert smem == [("cuFuncSetAttribute", ("fn:big_kernel", "maxsmem", 100 * 1024))]
    occ = [c[1] for c in drv.calls if c[0] == "cuOccupancyMaxActiveBlocksPerMultiprocessor"]
    assert occ == [("fn:small_kernel", 256, 40 * 1024), ("fn:big_kernel", 256, 100 * 1024)]


def test_no_cooperative_launch_support_refuses_every_entry(monkeypatch):
    _patch(monkeypatch, FakeDriver(coop=0))
    _, fns, whys = pe.load_cooperative("/bundle", torch.device("cuda", 0), [_entry("k", 4, 0)])
    assert not fns and whys == {"k-key": "the GPU does not support cooperative launches"}
