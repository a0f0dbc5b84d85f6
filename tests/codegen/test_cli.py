"""`rnn-sparsify compile` / `bench` registration: cheap import, typed errors -> exit codes."""
import argparse
import subprocess
import sys

import pytest

from rnn_sparsify.codegen import cli


def _parser():
    p = argparse.ArgumentParser(prog="rnn-sparsify", exit_on_error=False)
    sub = p.add_subparsers(dest="command", required=True)
    cli.register(sub)
    return p


def test_import_is_cheap():
    code = "import sys, rnn_sparsify.codegen.cli; print('tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_parse_compile_and_gate_spec():
    a = _parser().parse_args(["compile", "-o", "b", "--arch", "sm_80", "--arch", "sm_90", "--input-size", "8",
                              "--hidden-size", "8", "--batch", "2", "--seq-len", "3", "--gate", "coarse:P=4,R=8,S=2"])
    assert a.arch == ["sm_80", "sm_90"] and a.func is cli.cmd_compile
    assert a.gate == {"kind": "gate_gradient_sparsity", "mode": "coarse", "P": 4, "R": 8, "S": 2}
    assert cli._gate("meprop:keep=0.3")["keep"] == 0.3


def test_compile_without_spec_exits_2(capsys):
    rc = cli.main(["compile", "-o", "b", "--arch", "sm_90", "--batch", "2", "--seq-len", "3"])
    assert rc == 2 and "--input-size" in capsys.readouterr().err


def test_bad_arch_exit_code(tmp_path, capsys):
    rc = cli.main(["compile", "-o", str(tmp_path), "--arch", "sm_70", "--input-size", "8", "--hidden-size", "8",
                   "--batch", "2", "--seq-len", "3", "--p-input", "0.5"])
    assert rc == 2 and "sm_80 or newer" in capsys.readouterr().err


@pytest.mark.tvm
def test_compile_command_builds_bundle(tvm, nvcc, tmp_path):
    rc = cli.main(["compile", "-q", "-o", str(tmp_path / "b"), "--arch", "sm_90", "--input-size", "16",
                   "--hidden-size", "8", "--batch", "4", "--seq-len", "3", "--p-recurrent", "0.5",
                   "--dtype", "float16", "--cache-dir", str(tmp_path / "cache")])
    from rnn_sparsify.codegen.manifest import Manifest

    assert rc == 0
    kinds = sorted(e.spec["kind"] for e in Manifest.load(tmp_path / "b").kernels)
    assert kinds == ["gather_k", "gather_kn", "wgrad_t"]


def test_bench_without_gpu_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    (tmp_path / "manifest.json").write_text("{}")  # the bundle is checked first, then the GPU
    rc = cli.main(["bench", "--bundle", str(tmp_path), "--out", str(tmp_path / "b.md")])
    assert rc == 8 and "GPU" in capsys.readouterr().err


@pytest.mark.tvm
def test_compile_persistent_eval_spec(tvm, nvcc, tmp_path, capsys):
    from rnn_sparsify.codegen.manifest import Manifest
    from rnn_sparsify.codegen.persistent_sparse import nnz_bound

    rc = cli.main(["compile", "-q", "-o", str(tmp_path / "b"), "--arch", "sm_80", "--arch", "sm_90",
                   "--input-size", "16", "--hidden-size", "40", "--batch", "4", "--seq-len", "3",
                   "--persistent-eval", "--density", "0.3", "--dtype", "bfloat16",
                   "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0, out
    ents = Manifest.load(tmp_path / "b").kernels
    assert sorted(e.arch for e in ents) == ["sm_80", "sm_90"] and {e.launch for e in ents} == {"cooperative"}
    assert {e.spec["nnz"] for e in ents} == {-(-nnz_bound(40, 0.3) // 8) * 8}
    assert "persistent eval kernel sm_90: hidden 40, batch 4" in out and "cooperative launch" in out


@pytest.mark.tvm
def test_compile_persistent_eval_model_takes_the_pruned_rows(tvm, nvcc, tmp_path, capsys):
    from rnn_sparsify.codegen.manifest import Manifest

    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.LSTM(12, 24))\n"
        "    with torch.no_grad():\n"
        "        w = m[0].weight_hh_l0\n"
        "        w[:, 5:] = 0  # 5 non-zeros per gate row\n"
        "    return m\n")
    rc = cli.main(["compile", "-q", "-o", str(tmp_path / "b"), "--arch", "sm_90", "--model",
                   f"{tmp_path / 'm.py'}:make", "--batch", "2", "--seq-len", "3", "--persistent-eval",
                   "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0, out
    (e,) = Manifest.load(tmp_path / "b").kernels
    assert (e.spec["hidden_size"], e.spec["batch"], e.spec["nnz"], e.spec["dtype"]) == (24, 2, 8, "float32")


def test_compile_persistent_eval_option_errors(tmp_path, capsys):
    base = ["compile", "-o", str(tmp_path / "b"), "--arch", "sm_90", "--input-size", "8", "--hidden-size", "8",
            "--batch", "2", "--seq-len", "3"]
    assert cli.main(base + ["--nnz-max", "4"]) == 2
    assert "add --persistent-eval" in capsys.readouterr().err
    assert cli.main(base + ["--persistent-eval", "--density", "0"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert cli.main(base + ["--persistent-eval"]) == 7  # no bound for an LSTM spec
    assert "--nnz-max" in capsys.readouterr().err


def test_compile_sms_option_errors(tmp_path, capsys):
    base = ["compile", "-o", str(tmp_path / "b"), "--arch", "sm_80", "--input-size", "8", "--hidden-size", "8",
            "--batch", "2", "--seq-len", "3"]
    assert cli.main(base + ["--sms", "56"]) == 2
    assert "add --persistent-eval or --persistent-train" in capsys.readouterr().err
    assert cli.main(base + ["--persistent-eval", "--nnz-max", "4", "--sms", "114"]) == 2
    assert "sm_80 parts have 1..108 SMs" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.tvm
def test_compile_persistent_eval_for_two_sm_counts(tvm, nvcc, tmp_path, capsys):
    from rnn_sparsify.codegen.manifest import Manifest

    rc = cli.main(["compile", "-q", "-o", str(tmp_path / "b"), "--arch", "sm_90", "--input-size", "8",
                   "--hidden-size", "64", "--batch", "2", "--seq-len", "3", "--persistent-eval", "--nnz-max", "16",
                   "--sms", "16", "--sms", "32", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0, out
    ents = Manifest.load(tmp_path / "b").kernels
    assert sorted(e.grid[0] for e in ents) == [16, 32]  # 4 and 2 units per CTA
    assert "16 CTAs" in out and "32 CTAs" in out
