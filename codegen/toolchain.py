"""Finding the build tools: TVM (imported lazily), nvcc, and the SASS disassemblers.

Nothing here runs at ``import rnn_sparsify`` time; :func:`import_tvm` is called by the code
that compiles, and raises :class:`ToolchainMissing` with an install hint when TVM is absent.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

from .errors import ToolchainMissing

TVM_HINT = (
    'pip install "apache-tvm==0.27.0.post1" "apache-tvm-ffi==0.1.14.post1" '
    "(or: pip install 'rnn-sparsify[tvm]'); pin apache-tvm-ffi: 0.1.15 segfaults in tensorize"
)


def cuda_root() -> Path | None:
    """The real CUDA toolkit root: ``CUDA_PATH``/``CUDA_HOME``, else found from ``nvcc`` on PATH
    (which may be a wrapper script elsewhere, so TVM's own guess can be wrong)."""
    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return Path(root)
    return _cuda_root_from_path()


@functools.lru_cache(maxsize=None)
def _cuda_root_from_path() -> Path | None:
    exe = shutil.which("nvcc")
    if exe is None:
        return None
    path = Path(exe).resolve()
    if path.parent.name == "bin" and (path.parent.parent / "include" / "cuda.h").exists():
        return path.parent.parent
    try:  # a wrapper script: nvcc's dry run prints the folder of the real driver (_HERE_)
        out = subprocess.run(
            [exe, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        ).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if "_HERE_=" in line:
            here = Path(line.split("_HERE_=", 1)[1].strip())
            if (here / "nvcc").exists():
                return here.parent
    return None


def nvcc_path() -> str:
    """Path of the real ``nvcc``; :class:`ToolchainMissing` if there is none."""
    root = cuda_root()
    if root is None:
        raise ToolchainMissing(
            "nvcc not found: install the CUDA toolkit (12.x or 13.x) and put nvcc on PATH, "
            "or set CUDA_PATH to the toolkit root"
        )
    return str(root / "bin" / "nvcc")


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "release" in line:
            return line.split("release", 1)[1].split(",")[0].strip()
    return "unknown"


def import_tvm():
    """Import TVM for compiling, configured for nvcc (there is no NVRTC on build machines)."""
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    root = cuda_root()
    if root is not None:
        os.environ.setdefault("CUDA_PATH", str(root))
    try:
        import tvm  # noqa: F401
        from tvm import s_tir, te  # noqa: F401
    except ImportError as e:
        raise ToolchainMissing(f"TVM is needed to generate kernels ({e}); {TVM_HINT}") from e
    if not tvm.__version__.startswith("0.27"):
        raise ToolchainMissing(f"TVM {tvm.__version__} found; the generators target 0.27. {TVM_HINT}")
    return tvm


def have_tvm() -> bool:
    try:
        import_tvm()
    except ToolchainMissing:
        return False
    return True


def disassembler(name: str) -> str:
    """``cuobjdump`` or ``nvdisasm``: from the toolkit, PATH, or the ``nvidia-cuda-*`` PyPI wheel."""
    candidates = []
    root = cuda_root()
    if root is not None:
        candidates.append(root / "bin" / name)
    exe = shutil.which(name)
    if exe:
        candidates.append(Path(exe))
    site = Path(sysconfig.get_paths()["purelib"])
    candidates += sorted(site.glob(f"nvidia/*/bin/{name}"))
    for c in candidates:
        if c.exists() and os.access(c, os.X_OK):
            return str(c)
    raise ToolchainMissing(
        f"{name} not found: pip install nvidia-cuda-{name} (or put the CUDA toolkit's bin/ on PATH)"
    )


def sass(cubin: bytes | Path) -> str:
    """Disassembly of a cubin (``cuobjdump --dump-sass``)."""
    exe = disassembler("cuobjdump")
    if isinstance(cubin, (bytes, bytearray)):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            return _run_sass(exe, f.name)
    return _run_sass(exe, str(cubin))


def _run_sass(exe: str, path: str) -> str:
    r = subprocess.run([exe, "--dump-sass", path], capture_output=True, text=True)
    if r.returncode:
        raise ToolchainMissing(f"cuobjdump failed on {path}: {r.stderr.strip()[:500]}")
    return r.stdout
