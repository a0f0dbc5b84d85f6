"""Ahead-of-time compilation of indexed GEMMs into a kernel bundle (TVM + nvcc, no GPU needed).

    compile_lstms([LSTMSpec(...)], archs=["sm_80", "sm_90"], out_dir="bundles/ptb")
    compile_model(model, batch=64, seq_len=35, archs=["sm_90"], out_dir=...)
    compile_specs([GatherK(...), ...], archs, out_dir)

For each (kernel spec, arch): schedule (:mod:`.schedule`), ``tvm.compile`` to CUDA source,
``nvcc`` to a cubin and a PTX, and a manifest entry (:mod:`.manifest`). Every artifact is kept
in a cache folder keyed by the entry's content hash (spec, arch, generator version, TVM and
nvcc versions), so nothing is compiled twice; a bundle is a copy of the entries it needs.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from .errors import CodegenError, ToolchainMissing, UnsupportedGemm
from .gemm_gather import IndexedGemm
from .lstm_spec import LSTMSpec
from .manifest import KernelEntry, KernelParam, Manifest, content_hash, file_hash

GENERATOR_VERSION = "2"  # bump when generated code changes for the same spec (2: split-K generators)
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
_SIG = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\(([^)]*)\)')
_PARAM = re.compile(r"^\s*(?:const\s+)?([\w:]+)\s*\*?\s*(?:__restrict__\s+)?(\w+)\s*$")
_CTYPES = {"half": "float16", "nv_bfloat16": "bfloat16", "float": "float32", "int": "int32",
           "int64_t": "int64", "signed char": "int8"}


def default_cache_dir() -> Path:
    """``$RNN_SPARSIFY_CACHE``, else ``~/.cache/rnn_sparsify/kernels`` (one cache folder for the
    GPU bundles' entries and the CPU kernels' ``cpu/`` tree)."""
    from rnn_sparsify.kernels.cpu_runtime import cache_dir

    return cache_dir()


def _check_arch(arch: str) -> str:
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise UnsupportedGemm(f"arch must look like 'sm_90', got {arch!r}")
    if int(re.sub(r"\D", "", arch)) < 80:
        raise UnsupportedGemm(f"{arch}: the tensor-core kernels need sm_80 or newer (ldmatrix + mma.sync bf16)")
    return arch


def toolchain_versions() -> dict[str, str]:
    from .toolchain import import_tvm, nvcc_version

    tvm = import_tvm()
    return {"tvm": tvm.__version__, "nvcc": nvcc_version(), "generator": GENERATOR_VERSION}


def entry_key(spec, arch: str, versions: dict[str, str]) -> str:
    return content_hash({"spec": spec.to_dict(), "arch": arch, **versions})


def kernel_signature(cu: str, symbol: str) -> tuple[int | None, list[KernelParam]]:
    """``(launch bound, parameters in kernel order)`` from the generated CUDA source."""
    for m in _SIG.finditer(cu):
        if m.group(2) != symbol:
            continue
        params = []
        for raw in m.group(3).split(","):
            pm = _PARAM.match(raw)
            if pm is None:
                raise CodegenError(f"cannot parse kernel parameter {raw!r} of {symbol}")
            ctype, name = pm.group(1), pm.group(2)
            pointer = "*" in raw
            params.append(KernelParam(name=re.sub(r"_ptr$", "", name) if pointer else name,
                                      dtype=_CTYPES.get(ctype, ctype), pointer=pointer))
        return (int(m.group(1)) if m.group(1) else None), params
    raise CodegenError(f"kernel {symbol} not found in the generated CUDA source")


def _nvcc(args: list[str], what: str) -> str:
    from .toolchain import nvcc_path

    r = subprocess.run([nvcc_path(), *args], capture_output=True, text=True)
    if r.returncode:
        raise CodegenError(f"nvcc ({what}) failed:\n{r.stderr[-3000:]}")
    return r.stderr


def _cubin(cu: str, folder: Path, base: str, symbol: str, arch: str) -> tuple[int | None, int | None, str]:
    """Write ``base.cu`` into ``folder`` and build ``base.cubin`` (ptxas -v): ``(registers, spill
    bytes, ptxas log)``, the numbers None where the log has no such line."""
    (folder / f"{base}.cu").write_text(cu)
    log = _nvcc(["--cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-o", str(folder / f"{base}.cubin"),
                 str(folder / f"{base}.cu")], f"cubin {symbol} {arch}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None), log


def _ptx(folder: Path, base: str, symbol: str, arch: str) -> dict:
    """Build ``base.ptx`` beside the cubin; the entry's file fields of ``base`` (names, hashes)."""
    _nvcc(["--ptx", "-O3", f"-arch={arch.replace('sm_', 'compute_')}", "-o", str(folder / f"{base}.ptx"),
           str(folder / f"{base}.cu")], f"ptx {symbol} {arch}")
    return dict(source=f"{base}.cu", cubin=f"{base}.cubin", cubin_sha256=file_hash(folder / f"{base}.cubin"),
                ptx=f"{base}.ptx", ptx_sha256=file_hash(folder / f"{base}.ptx"))


def build_entry(spec: IndexedGemm, arch: str, folder: Path, versions: dict[str, str]) -> KernelEntry:
    """Generate, compile and describe one kernel into ``folder`` (no cache)."""
    import tvm

    from .schedule import cuda_schedule, pass_config

    _check_arch(arch)
    sch, grid, block = cuda_schedule(spec)
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    config = pass_config(spec)  # cp.async for the software-pipelined kernels, else none
    if config:
        with tvm.transform.PassContext(config=config):
            lib = tvm.compile(sch.mod, target=target)
    else:
        lib = tvm.compile(sch.mod, target=target)
    cu = lib.mod.imports[0].inspect_source("cuda")
    symbol = f"{spec.name}_kernel"
    bound, params = kernel_signature(cu, symbol)
    threads = block[0] * block[1] * block[2]
    if bound is not None and bound != threads:
        raise CodegenError(f"{symbol}: __launch_bounds__({bound}) != block {block} from the schedule")
    expect = {n for n, _, _ in spec.params()}
    if {p.name for p in params} != expect:
        raise CodegenError(f"{symbol}: kernel parameters {[p.name for p in params]} != buffers {sorted(expect)}")
    base = f"{spec.name}.{arch}"
    regs, spill, _ = _cubin(cu, folder, base, symbol, arch)
    return KernelEntry(
        key=entry_key(spec, arch, versions),
        spec=spec.to_dict(),
        arch=arch,
        symbol=symbol,
        params=tuple(params),
        grid=tuple(grid),
        block=tuple(block),
        dynamic_smem_bytes=0,  # the schedules use static shared memory only
        **_ptx(folder, base, symbol, arch),
        registers=regs,
        spill_bytes=spill,
    )


def build_persistent_entry(spec, arch: str, folder: Path, versions: dict[str, str]) -> KernelEntry:
    """Generate, compile and describe one sparse persistent eval kernel
    (:mod:`.persistent_sparse`) into ``folder``; refuses (``UnsupportedGemm``) a grid that
    cannot be co-resident on ``arch``, from ptxas's register count and the shared memory."""
    from . import persistent_sparse, persistent_train
    from .persistent_sparse import dynamic_smem_bytes
    from .toolchain import import_tvm

    gen = persistent_train if getattr(spec, "kind", None) in persistent_train.KINDS else persistent_sparse
    tvm = import_tvm()
    _check_arch(arch)
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    mod = tvm.IRModule({spec.name: gen.make_kernel(spec)})
    lib = tvm.compile(mod, target=target)
    cu = lib.mod.imports[0].inspect_source("cuda")
    symbol = f"{spec.name}_kernel"
    bound, params = kernel_signature(cu, symbol)
    if bound is not None and bound != spec.threads:
        raise CodegenError(f"{symbol}: __launch_bounds__({bound}) != {spec.threads} threads of the spec")
    expect = {n for n, _, _ in spec.params()} | {"Tn"} | set(getattr(spec, "scalars", ()))
    if {p.name for p in params} != expect:
        raise CodegenError(f"{symbol}: kernel parameters {[p.name for p in params]} != {sorted(expect)}")
    smem = dynamic_smem_bytes(mod, target)
    # the training loops' smem_bytes() is an estimate (TVM's merge adds up to a few dozen
    # bytes of alignment); their co-residency check takes TVM's number
    if gen is persistent_sparse and smem != spec.smem_bytes():
        raise CodegenError(f"{symbol}: TVM allocates {smem} B of dynamic shared memory, the spec expects "
                           f"{spec.smem_bytes()} B")
    base = f"{spec.name}.{arch}"
    regs, spill, log = _cubin(cu, folder, base, symbol, arch)
    if regs is None:
        raise CodegenError(f"{symbol}: no register count in the ptxas log:\n{log[-1500:]}")
    why = gen.coresidency_problem(spec, arch, regs, smem)
    if why:
        raise UnsupportedGemm(why)
    return KernelEntry(
        key=entry_key(spec, arch, versions),
        spec=spec.to_dict(),
        arch=arch,
        symbol=symbol,
        params=tuple(params),
        grid=(spec.grid, 1, 1),
        block=(spec.threads, 1, 1),
        dynamic_smem_bytes=smem,
        **_ptx(folder, base, symbol, arch),
        registers=regs,
        spill_bytes=spill,
        launch="cooperative",
    )


def cached_entry(spec, arch: str, cache_dir: Path, versions: dict[str, str]) -> tuple[KernelEntry, Path, bool]:
    """The cache folder of ``(spec, arch)``, building it on a miss. Returns ``(entry, folder, hit)``."""
    import json

    key = entry_key(spec, arch, versions)
    folder = cache_dir / key[:2] / key
    meta = folder / "entry.json"
    if meta.is_file():
        entry = KernelEntry.from_dict(json.loads(meta.read_text()))
        if all((folder / f).is_file() for f in (entry.cubin, entry.source)) and file_hash(folder / entry.cubin) == entry.cubin_sha256:
            return entry, folder, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        from .persistent_sparse import KIND as PERSISTENT
        from .persistent_train import KINDS as PERSISTENT_TRAIN

        build = build_persistent_entry if getattr(spec, "kind", None) in (PERSISTENT, *PERSISTENT_TRAIN) else build_entry
        entry = build(spec, arch, tmp, versions)
        (tmp / "entry.json").write_text(json.dumps(entry.to_dict(), indent=1, sort_keys=True))
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)  # atomic publish: a half-built entry is never visible
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry, folder, False


def compile_specs(
    specs: Iterable[IndexedGemm],
    archs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    lstms: Sequence[LSTMSpec] = (),
    persistent: Sequence = (),
    persistent_train: Sequence = (),
) -> Manifest:
    """Build every ``(spec, arch)`` into the bundle folder ``out_dir`` and write its manifest.

    ``persistent``: :class:`~.persistent_sparse.PersistentEvalRequest` s, each built for every
    arch as a sparse persistent eval kernel (one CTA per SM of the arch's reference part).
    ``persistent_train``: :class:`~.persistent_train.PersistentTrainRequest` s, each built for
    every arch as the forward and backward-data persistent training loops."""
    from .toolchain import nvcc_path

    archs = tuple(_check_arch(a) for a in archs)
    if not archs:
        raise UnsupportedGemm("give at least one target arch (e.g. sm_90)")
    nvcc_path()  # fail early with ToolchainMissing
    versions = toolchain_versions()
    specs = list(specs)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(s, a) for s in specs for a in archs]
    if persistent:
        from .persistent_sparse import spec_for_arch

        for req in dict.fromkeys(persistent):
            for a in archs:
                jobs.append((spec_for_arch(req.hidden_size, req.batch, req.nnz, req.dtype, a, sms=req.sms), a))
    for req in dict.fromkeys(persistent_train):
        for a in archs:
            jobs.extend((s, a) for s in req.specs(a))
    entries, hits = [], 0
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; keep working without it
        tqdm = None
    bar = tqdm(total=len(jobs), desc="compile kernels", unit="kernel", disable=not progress) if tqdm else None
    for spec, arch in jobs:
        if bar is not None:
            bar.set_postfix_str(f"{spec.kind} {arch}")
        entry, folder, hit = cached_entry(spec, arch, cache, versions)
        hits += hit
        for f in (entry.source, entry.cubin, entry.ptx):
            if f:
                shutil.copy2(folder / f, out / f)
        entries.append(entry)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    manifest = Manifest(kernels=tuple(entries), archs=archs, toolchain=versions,
                        lstms=tuple(l.to_dict() for l in lstms))
    manifest.save(out)
    compile_specs.last_stats = {"kernels": len(jobs), "cache_hits": hits}
    return manifest


def compile_persistent(requests: Sequence, archs: Sequence[str], out_dir, **kw) -> Manifest:
    """Build only sparse persistent eval kernels (see :func:`compile_specs`'s ``persistent``)."""
    return compile_specs((), archs, out_dir, persistent=requests, **kw)


def compile_persistent_train(requests: Sequence, archs: Sequence[str], out_dir, **kw) -> Manifest:
    """Build only persistent training loops (see :func:`compile_specs`'s ``persistent_train``)."""
    return compile_specs((), archs, out_dir, persistent_train=requests, **kw)


def compile_lstms(lstms: Sequence[LSTMSpec], archs: Sequence[str], out_dir, **kw) -> Manifest:
    """Build every kernel the LSTMs need (see :mod:`.lstm_spec`)."""
    seen, specs = set(), []
    for lstm in lstms:
        for _method, spec in lstm.gemms():
            if spec.problem not in seen:
                seen.add(spec.problem)
                specs.append(spec)
    return compile_specs(specs, archs, out_dir, lstms=lstms, **kw)


def compile_model(model, batch: int, seq_len: int, archs: Sequence[str], out_dir, dtype: str | None = None, *,
                  structured_dropout=None, gate_sparsity=None, **kw) -> Manifest:
    """Build the kernels ``model`` needs for one batch size and sequence length: every sparse
    ``SparseLSTM``/``SparseLSTMCell``/hand-written cell, with the configs on the model or, if
    given, the model sparsified with ``structured_dropout``/``gate_sparsity`` first (see
    :func:`~.model_plan.plan_model`, which also says why an LSTM is not built)."""
    from .model_plan import plan_model

    plan = plan_model(model, batch, seq_len, dtype, structured_dropout=structured_dropout,
                      gate_sparsity=gate_sparsity)
    if not plan.lstms:
        why = "; ".join(f"{e.name}: {e.reason}" for e in plan.entries)
        raise UnsupportedGemm(f"{type(model).__name__}: no LSTM needs a sparse kernel ({why})")
    return compile_lstms(plan.lstms, archs, out_dir, **kw)


__all__ = [
    "ARCHS", "compile_specs", "compile_lstms", "compile_persistent", "compile_persistent_train", "compile_model", "default_cache_dir",
    "kernel_signature", "ToolchainMissing",
]
