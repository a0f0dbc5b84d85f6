"""Loading (and, on first use, building) the TVM-generated CPU kernel libraries.

Run time needs only ``apache-tvm-ffi`` (imported lazily, at the first kernel call) and a C
compiler the first time, for :file:`cpu_runtime.c` (the thread pool and workspace hooks the
exported libraries call; normally libtvm_runtime provides them). ``apache-tvm`` is needed only
to *build* a library that is in neither a registered bundle nor the cache; then the build
happens here, once, with a message on stderr, and lands in the cache.

Cache layout (``$RNN_SPARSIFY_CACHE``, default ``~/.cache/rnn_sparsify/kernels``)::

    cpu/<key[:2]>/<key>/layer.so       the kernels of one layer/direction shape
    cpu/<key[:2]>/<key>/manifest.json  the spec, the library's sha256, build facts
    cpu/runtime-<hash>-<machine>.so    the compiled cpu_runtime.c

``key`` is the sha256 of the spec (sizes, kept counts, ISA class, generator version). A library
whose sha256 does not match its manifest is rebuilt (or, without TVM, refused with a warning).
``rnn-sparsify compile --target cpu -o DIR`` writes the same ``cpu/`` tree into ``DIR``; a
bundle registered with :func:`use_cpu_bundle` (or ``RNN_SPARSIFY_KERNELS=DIR``) is searched
before the cache.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rnn_sparsify.codegen.cpu_lstm import GENERATOR_VERSION, CpuLayerSpec

_HERE = Path(__file__).resolve().parent
_LOCK = threading.Lock()
_RUNTIME: Optional[ctypes.CDLL] = None
_LOADED: dict[str, "LayerLibrary"] = {}
_BUNDLES: list[Path] = []
_ENV_CHECKED = False


class KernelUnavailable(RuntimeError):
    """No kernel library for a shape, and it cannot be built here (the message says why)."""


# --------------------------------------------------------------------------------------
# machine facts


_ISA: Optional[str] = None


def host_isa() -> str:
    """Cached :func:`detect_isa` (the environment override is read on every call)."""
    global _ISA
    if os.environ.get("RNN_SPARSIFY_CPU_ISA"):
        return detect_isa()
    if _ISA is None:
        _ISA = detect_isa()
    return _ISA


def detect_isa() -> str:
    """ISA class of this CPU for the kernels: ``avx512``, ``avx2`` or ``generic``.

    Read from ``/proc/cpuinfo`` (x86-64 Linux); anything else (Arm NEON, other systems) is
    ``generic`` (128-bit vectors). ``RNN_SPARSIFY_CPU_ISA`` overrides (for tests).
    """
    env = os.environ.get("RNN_SPARSIFY_CPU_ISA")
    if env:
        if env not in ("avx512", "avx2", "generic"):
            raise ValueError(f"RNN_SPARSIFY_CPU_ISA must be avx512, avx2 or generic, got {env!r}")
        return env
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "generic"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "generic"


def cache_dir() -> Path:
    env = os.environ.get("RNN_SPARSIFY_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rnn_sparsify" / "kernels"


def tvm_ffi_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("tvm_ffi") is not None
    except Exception:  # pragma: no cover
        return False


def tvm_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("tvm") is not None
    except Exception:  # pragma: no cover
        return False


def _is_sparse_eval(spec) -> bool:
    return getattr(spec, "kind", "") == "sparse_eval"


def spec_key(spec: CpuLayerSpec) -> str:
    blob = json.dumps(spec.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# the C runtime (thread pool + workspace hooks)


def _runtime_path(root: Path) -> Path:
    src = (_HERE / "cpu_runtime.c").read_bytes()
    tag = hashlib.sha256(src).hexdigest()[:16]
    return root / "cpu" / f"runtime-{tag}-{platform.machine()}.so"


def build_runtime(dest: Path) -> Path:
    """Compile :file:`cpu_runtime.c` to ``dest`` (atomic rename)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise KernelUnavailable("no C compiler (cc/gcc/clang) to build the kernel runtime")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=dest.parent)
    os.close(fd)
    cmd = [cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", tmp, str(_HERE / "cpu_runtime.c")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(f"building the kernel runtime failed: {res.stderr.strip()[:500]}")
    os.replace(tmp, dest)
    return dest


def runtime() -> ctypes.CDLL:
    """The loaded C runtime (built into the cache on first use; a bundle's copy is preferred)."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    with _LOCK:
        if _RUNTIME is not None:
            return _RUNTIME
        path = None
        for root in _search_roots():
            p = _runtime_path(root)
            if p.exists():
                path = p
                break
        if path is None:
            path = build_runtime(_runtime_path(_writable_cache()))
        lib = ctypes.CDLL(str(path))
        lib.rnnsp_set_num_threads.argtypes = [ctypes.c_int]
        lib.rnnsp_get_num_threads.restype = ctypes.c_int
        gomp = _process_libgomp()
        if gomp is not None:
            lib.rnnsp_use_gomp.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            lib.rnnsp_use_gomp(ctypes.cast(gomp.GOMP_parallel, ctypes.c_void_p),
                               ctypes.cast(gomp.omp_get_thread_num, ctypes.c_void_p))
        _RUNTIME = lib
    return _RUNTIME


def _process_libgomp() -> Optional[ctypes.CDLL]:
    """The GNU OpenMP runtime this process already loaded (torch's), if any: the kernels'
    parallel loops then share torch's pool instead of starting a second one that would spin
    against it on few cores. ``RNN_SPARSIFY_CPU_POOL=own`` forces the built-in pool."""
    if os.environ.get("RNN_SPARSIFY_CPU_POOL", "") == "own":
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libgomp" in ln}
    except OSError:
        return None
    for p in sorted(paths):
        if os.path.exists(p):
            try:
                lib = ctypes.CDLL(p)
                lib.GOMP_parallel, lib.omp_get_thread_num  # noqa: B018 - both must exist
                return lib
            except (OSError, AttributeError):
                continue
    return None


def set_num_threads(n: int) -> None:
    rt = runtime()
    if rt.rnnsp_get_num_threads() != n:
        rt.rnnsp_set_num_threads(int(n))


_HOOKS = ("TVMBackendParallelLaunch", "TVMBackendAllocWorkspace", "TVMBackendFreeWorkspace")


def _install_hooks(lib_path: Path) -> None:
    """Point the library's ``__TVMBackend*`` function pointers at our runtime."""
    rt = runtime()
    lib = ctypes.CDLL(str(lib_path))  # same handle as tvm_ffi's dlopen of the same file
    for name in _HOOKS:
        try:
            slot = ctypes.c_void_p.in_dll(lib, "__" + name)
        except ValueError:
            continue  # the library does not use this hook
        slot.value = ctypes.cast(getattr(rt, name), ctypes.c_void_p).value


# --------------------------------------------------------------------------------------
# bundles and the cache


def use_cpu_bundle(path) -> None:
    """Search ``path`` (made by ``rnn-sparsify compile --target cpu``) before the cache."""
    p = Path(path)
    if not (p / "cpu").is_dir():
        raise FileNotFoundError(f"{p} holds no CPU kernels (no cpu/ folder); build it with "
                                f"`rnn-sparsify compile --target cpu -o {p}`")
    if p not in _BUNDLES:
        _BUNDLES.insert(0, p)


def _search_roots() -> list[Path]:
    global _ENV_CHECKED
    if not _ENV_CHECKED:
        _ENV_CHECKED = True
        env = os.environ.get("RNN_SPARSIFY_KERNELS")
        if env and (Path(env) / "cpu").is_dir():
            _BUNDLES.append(Path(env))
    return [*_BUNDLES, cache_dir()]


def _writable_cache() -> Path:
    root = cache_dir()
    try:
        (root / "cpu").mkdir(parents=True, exist_ok=True)
        probe = root / "cpu" / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise KernelUnavailable(
            f"the kernel cache folder {root} is not writable ({e.strerror}); set "
            "RNN_SPARSIFY_CACHE to a writable folder"
        ) from None
    return root


def entry_dir(root: Path, spec: CpuLayerSpec) -> Path:
    key = spec_key(spec)
    return root / "cpu" / key[:2] / key


def _valid_entry(folder: Path) -> bool:
    try:
        man = json.loads((folder / "manifest.json").read_text())
        return _sha256(folder / "layer.so") == man["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def build_entry(spec: CpuLayerSpec, root: Path, *, quiet: bool = False) -> Path:
    """Build the library of ``spec`` into ``root``'s cpu tree (needs TVM); returns its folder."""
    from rnn_sparsify.codegen import cpu_lstm, cpu_sparse  # import TVM lazily inside

    build = cpu_sparse.build_library if _is_sparse_eval(spec) else cpu_lstm.build_layer_library
    folder = entry_dir(root, spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    t0 = time.perf_counter()
    if not quiet:
        what = (spec.describe() if _is_sparse_eval(spec) else
                f"an LSTM layer (input {spec.input_size}, hidden {spec.hidden_size}, batch "
                f"{spec.batch}, kept {spec.k_in}/{spec.k_rec}, {spec.isa})")
        print(f"rnn_sparsify: compiling CPU kernels for {what} ...", file=sys.stderr, flush=True)
    try:
        build(spec, str(tmp / "layer.so"))
        man = {"spec": spec.to_dict(), "sha256": _sha256(tmp / "layer.so"),
               "mcpu": cpu_lstm.build_mcpu(spec), "tvm": cpu_lstm.tvm_version(),
               "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "manifest.json").write_text(json.dumps(man, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"rnn_sparsify: compiled in {time.perf_counter() - t0:.1f} s ({folder})",
              file=sys.stderr, flush=True)
    return folder


def find_or_build(spec: CpuLayerSpec) -> Path:
    """The folder holding ``spec``'s library: a bundle, the cache, or a fresh build."""
    for root in _search_roots():
        folder = entry_dir(root, spec)
        if (folder / "layer.so").exists():
            if _valid_entry(folder):
                return folder
            if root != cache_dir():
                continue  # a corrupt bundle entry: try the cache
    if not tvm_available():
        raise KernelUnavailable(
            "no precompiled CPU kernels for this shape and apache-tvm is not installed to build "
            "them (pip install 'rnn-sparsify[tvm]', or build a bundle elsewhere with "
            "`rnn-sparsify compile --target cpu`)"
        )
    return build_entry(spec, _writable_cache())


@dataclass
class LayerLibrary:
    """The loaded kernels of one spec: ``lib["fwd_loop"](...)`` etc."""

    spec: CpuLayerSpec
    path: Path
    funcs: dict

    def __getitem__(self, name):
        return self.funcs[name]


def load_layer(spec: CpuLayerSpec) -> LayerLibrary:
    """Load (building on first use) the kernel library of ``spec``; cached per process."""
    key = spec_key(spec)
    lib = _LOADED.get(key)
    if lib is not None:
        return lib
    if not tvm_ffi_available():
        raise KernelUnavailable("apache-tvm-ffi is not installed (pip install apache-tvm-ffi)")
    import tvm_ffi

    folder = find_or_build(spec)
    path = folder / "layer.so"
    mod = tvm_ffi.load_module(str(path))
    _install_hooks(path)  # after load_module: a TVM in the process must not install its pool
    if _is_sparse_eval(spec):
        from rnn_sparsify.codegen.cpu_sparse import KERNEL_NAMES as names
    else:
        names = ("pack_in", "in_proj", "fwd_loop", "bwd_loop", "bwd_elem", "bwd_dh", "wgrad_in",
                 "wgrad_rec", "dx", "to_wt_in", "to_wt_rec") + (("bwd_coarse",) if spec.coarse else ())
    lib = LayerLibrary(spec, path, {n: mod[n] for n in names})
    lib.module = mod  # keep the module alive
    with _LOCK:
        _LOADED[key] = lib
    return lib


__all__ = [
    "GENERATOR_VERSION",
    "KernelUnavailable",
    "LayerLibrary",
    "build_entry",
    "cache_dir",
    "find_or_build",
    "host_isa",
    "load_layer",
    "set_num_threads",
    "spec_key",
    "use_cpu_bundle",
]
