"""The benchmark scripts run end to end at toy sizes (they measure nothing here; they must
not rot between the sessions that measure with them)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_cpu_sparse_eval_benchmark_runs(tmp_path):
    pytest.importorskip("tvm")
    d = _run("cpu_sparse_eval.py", "--hidden", "24", "--batch", "3", "--sparsity", "0.95", "--threads", "1",
             "--repeats", "1", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in d["rows"]}
    assert set(rows) == {"nn.LSTM", "SparseLSTM (auto)", "sparse kernels (forced)", "torch.sparse_csr loop"}
    assert rows["sparse kernels (forced)"]["path"] == "sparse_eval"
    assert rows["nn.LSTM"]["speedup"] == 1.0 and d["machine"]


def test_cpu_train_step_benchmark_runs(tmp_path):
    pytest.importorskip("tvm")
    d = _run("cpu_train_step.py", "--hidden", "24", "--batch", "3", "--seq", "4", "--threads", "1",
             "--repeats", "1", "--only", "SD(", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in d["rows"]}
    assert rows["SD(0.5, 0.5)"]["backend"] == "tvm_cpu"
    assert rows["nn.LSTM (dropout 0.5)"]["speedup"] == 1.0


def test_gpu_sparse_eval_benchmark_skips_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check.sh runs this benchmark for real")
    d = _run("gpu_sparse_eval.py", "--hidden", "24", "--batch", "2", "--seq", "3", tmp_path=tmp_path)
    assert d["skipped"].startswith("skipped: needs a CUDA GPU") and d["config"]["hidden"] == 24


def test_gpu_sparse_eval_selfcheck_runs_its_code_on_the_cpu(tmp_path):
    d = _run("gpu_sparse_eval.py", "--selfcheck", tmp_path=tmp_path)
    assert d["selfcheck"] and [r["variant"] for r in d["rows"]] == ["nn.LSTM", "persistent kernels",
                                                                   "SparseLSTM (auto)"]
    assert d["routing"] is None and "not on CUDA" in d["auto_reason"]  # CPU: rule 1 does not apply

