"""examples/train_lm.py, the README's main job, at tiny settings in a subprocess: the JSON
summary of the dense-vs-sparse comparison, the one-line error for a bad data folder, and each
weight-sparsity method (the former train_weight_sparse_lm.py) hitting its sparsity."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_lm.py")
TINY = ["--steps", "3", "--hidden", "16", "--emb", "16", "--vocab", "500", "--batch", "4", "--seq", "8",
        "--eval-batches", "2", "--curve-points", "1"]


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_train_lm_compare_writes_json(tmp_path):
    out = tmp_path / "res" / "lm.json"
    plot = tmp_path / "res" / "lm.png"
    r = _run([*TINY, "--out", str(out), "--plot", str(plot)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [x["variant"] for x in runs] == ["dense", "sparse"]
    for x in runs:
        for key in ("val_ppl", "test_ppl", "ms_per_step"):
            assert isinstance(x[key], float) and math.isfinite(x[key]) and x[key] > 0, (key, x)
    assert "speed-up" in r.stdout and "sequential" in r.stdout
    assert "LSTM" in r.stdout and "sparse LSTM layer backend:" in r.stdout  # the sparsify report
    assert plot.is_file() or "no plot: matplotlib" in r.stdout
    assert not (tmp_path / "runs").exists()  # --plot given: nothing at the default place


def test_train_lm_no_compare(tmp_path):
    out = tmp_path / "lm.json"
    r = _run([*TINY, "--no-compare", "--no-plot", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["variant"] for x in json.loads(out.read_text())["runs"]] == ["sparse"]


def test_train_lm_bad_data_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (partial / name).write_text("" if name == "test.txt" else "a b c\n")
    for folder, word in ((tmp_path / "nope", "not a folder"), (empty, "missing"), (partial, "empty")):
        r = _run(["--data", str(folder), *TINY], tmp_path)
        assert r.returncode == 2, (folder, r.returncode, r.stderr)
        err = r.stderr.strip().splitlines()
        assert "Traceback" not in r.stderr
        assert word in err[-1] and str(folder) in err[-1], err
        assert len([l for l in err if not l.startswith("usage:") and not l.startswith(" ")]) == 1, err


def test_train_lm_weight_sparsity_methods_hit_their_sparsity(tmp_path):
    common = [*TINY, "--steps", "10", "--no-compare", "--no-plot", "--sparse-dropout", "standard",
              "--gate", "none", "--weight-freq", "2", "--update-every", "2", "--optimizer", "adam"]
    want = {"gradual": 0.9, "dst": 0.67, "static": 0.67}
    for method, sparsity in want.items():
        out = tmp_path / f"{method}.json"
        r = _run([*common, "--weight-method", method, "--out", str(out)], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(out.read_text())
        (run,) = summary["runs"]
        assert run["variant"] == "sparse" and 1 < run["val_ppl"] < 500, run["val_ppl"]
        assert abs(run["lstm_weight_sparsity"] - sparsity) < 0.01, (method, run["lstm_weight_sparsity"])
        assert abs(run["lstm_flops_ratio"] - (1 - sparsity)) < 0.01
        cfg = summary["config"]
        assert cfg["weight_method"] == method and cfg["structured_dropout"] is None and cfg["optimizer"] == "adam"
        assert cfg["lr"] == 2e-3 and cfg["weight_sparsity"]["prune_rate" if method != "gradual" else "freq"] == (
            {"dst": 0.5, "static": 0.0, "gradual": 2}[method])
        assert "weight_ih_l0" in r.stdout  # the per-gate sparsity table


def test_train_lm_dense_only_and_nothing_to_sparsify(tmp_path):
    out = tmp_path / "dense.json"
    r = _run([*TINY, "--dense-only", "--no-plot", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["variant"] for x in json.loads(out.read_text())["runs"]] == ["dense"]
    assert "sparsify(" not in r.stdout
    r = _run([*TINY, "--sparse-dropout", "standard", "--gate", "none"], tmp_path)
    assert r.returncode == 2 and "nothing to sparsify" in r.stderr.strip().splitlines()[-1], r.stderr
