"""`rnn-sparsify compile --target cpu`: a bundle that a TVM-free process loads without building."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")

CLI = str(Path(sys.executable).with_name("rnn-sparsify"))


def test_cpu_bundle_builds_and_loads_without_tvm(tmp_path):
    out = tmp_path / "bundle"
    res = subprocess.run([CLI, "compile", "--target", "cpu", "-o", str(out), "--input-size", "24",
                          "--hidden-size", "20", "--num-layers", "2", "--batch", "3", "--seq-len", "4",
                          "--p-input", "0.5", "--p-recurrent", "0.5", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    libs = sorted(out.glob("cpu/*/*/layer.so"))
    assert len(libs) == 2  # layer 0 (input 24) and layer 1 (input 20)
    man = json.loads((libs[0].parent / "manifest.json").read_text())
    assert len(man["sha256"]) == 64 and man["spec"]["hidden_size"] == 20
    assert list(out.glob("cpu/runtime-*.so"))

    # a fresh process: empty cache, the bundle through the environment, TVM never imported
    code = (
        "import sys, torch\n"
        "from rnn_sparsify import SparseLSTM, StructuredDropout\n"
        "torch.manual_seed(0)\n"
        "m = SparseLSTM(24, 20, num_layers=2, structured_dropout=StructuredDropout(0.5, 0.5))\n"
        "y, _ = m(torch.randn(4, 3, 24)); y.sum().backward()\n"
        "print(m.last_backend, 'tvm' in sys.modules, 'tvm_ffi' in sys.modules)\n"
    )
    env = {**os.environ, "RNN_SPARSIFY_KERNELS": str(out), "RNN_SPARSIFY_CACHE": str(tmp_path / "empty")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["tvm_cpu", "False", "True"]
    assert "compiling" not in run.stderr  # nothing was built: the bundle served both layers
    assert not (tmp_path / "empty" / "cpu").exists() or not list((tmp_path / "empty").glob("cpu/*/*/layer.so"))


def test_cpu_target_needs_sparsity(tmp_path):
    res = subprocess.run([CLI, "compile", "--target", "cpu", "-o", str(tmp_path / "b"), "--input-size", "8",
                          "--hidden-size", "8", "--batch", "2", "--seq-len", "3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 7 and "nothing to build" in res.stderr
    assert "Traceback" not in res.stderr


def test_cuda_target_still_needs_arch(tmp_path):
    res = subprocess.run([CLI, "compile", "-o", str(tmp_path / "b"), "--input-size", "8", "--hidden-size", "8",
                          "--batch", "2", "--seq-len", "3", "--p-input", "0.5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--arch" in res.stderr


def test_eval_kernels_bundle_serves_weight_sparse_eval_without_tvm(tmp_path):
    out = tmp_path / "bundle"
    res = subprocess.run([CLI, "compile", "--target", "cpu", "-o", str(out), "--input-size", "24",
                          "--hidden-size", "20", "--num-layers", "2", "--batch", "3", "--seq-len", "4",
                          "--eval-kernels", "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    mans = [json.loads(p.read_text()) for p in out.glob("cpu/*/*/manifest.json")]
    assert sorted((m["spec"]["kind"], m["spec"]["input_size"]) for m in mans) == [
        ("sparse_eval", 20), ("sparse_eval", 24)]
    code = (
        "import sys, torch\n"
        "from rnn_sparsify import SparseLSTM\n"
        "from rnn_sparsify.weight_sparsity import WeightSparsity, attach_weight_sparsity\n"
        "torch.manual_seed(0)\n"
        "m = SparseLSTM(24, 20, num_layers=2)\n"
        "attach_weight_sparsity(m, WeightSparsity('dst', total_steps=10, target_sparsity=0.95))\n"
        "m.eval()\n"
        "x = torch.randn(4, 3, 24)\n"
        "with torch.no_grad():\n"
        "    y = m(x)[0]; r = torch.nn.LSTM.forward(m, x)[0]\n"
        "print(m.last_eval_backend, 'tvm' in sys.modules, float((y - r).abs().max()) < 1e-5)\n"
    )
    env = {**os.environ, "RNN_SPARSIFY_KERNELS": str(out), "RNN_SPARSIFY_CACHE": str(tmp_path / "empty")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["tvm_cpu_sparse_eval", "False", "True"]
    assert "compiling" not in run.stderr


def test_eval_kernels_for_every_lstm_of_a_model(tmp_path):
    model = tmp_path / "m.py"
    model.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.a = torch.nn.LSTM(12, 16, 2); self.b = torch.nn.LSTM(16, 8, bidirectional=True)\n"
        "        self.p = torch.nn.LSTM(8, 8, proj_size=4)\n"
        "def make():\n"
        "    return M()\n")
    out = tmp_path / "bundle"
    res = subprocess.run([CLI, "compile", "--target", "cpu", "-o", str(out), "--model", f"{model}:make",
                          "--batch", "5", "--seq-len", "3", "--eval-kernels", "-q"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    specs = sorted((m["spec"]["input_size"], m["spec"]["hidden_size"], m["spec"]["batch"])
                   for m in (json.loads(p.read_text()) for p in out.glob("cpu/*/*/manifest.json")))
    # a: layer 0 (12 -> 16) and layer 1 (16 -> 16); b: 16 -> 8; p has a projection: none
    assert specs == [(12, 16, 8), (16, 8, 8), (16, 16, 8)]
    assert "weight-sparse eval kernels for 2 nn.LSTM module(s)" in res.stdout
