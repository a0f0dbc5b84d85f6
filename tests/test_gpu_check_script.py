"""CI rehearsal of `scripts/gpu_check.sh run` on the CPU: the carried wheel in a fresh venv,
imported and collected from the folders the run stage uses, and the GPU benchmarks' CPU
self-checks run from there (the source folder must not shadow
the wheel: from the repository root `rnn_sparsify.codegen` does not exist)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_run_stage_imports_the_wheel(tmp_path):
    if shutil.which("python3") is None:
        pytest.skip("no python3 on PATH")
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "rehearse", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    status = (tmp_path / "run" / "status").read_text()
    assert "imports rc=0" in status and "tests rc=0" in status and "bench rc=0" in status, status
    # the benchmarks' CPU self-checks ran from the run stage's folder on the wheel
    selfcheck = (tmp_path / "run" / "bench_selfcheck.log").read_text()
    assert "| SparseLSTM, per-step GEMMs |" in selfcheck and "goal: >= 1.8x" in selfcheck, selfcheck
    assert "routing verdict (auto, first call)" in selfcheck, selfcheck
    imported = (tmp_path / "run" / "imports.log").read_text()
    assert "site-packages" in imported and str(tmp_path) in imported, imported  # the wheel, not ./rnn_sparsify
    # the failure the run stage avoids: the same venv from the repository root
    bad = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import rnn_sparsify.codegen"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "rnn_sparsify.codegen" in bad.stderr
