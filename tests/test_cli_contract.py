"""The CLI contract, as a newcomer meets it: the installed ``rnn-sparsify`` console script, run
as a subprocess from a folder of its own (not the repository), for every command x case.

Slow-ish (one interpreter start per cell, ~2 s on 2 cores). Each cell: the documented exit code (``rnn_sparsify.target.EXIT_CODES``), no traceback, and on
failure exactly one line on stderr. ``None`` marks a case a command has no option for.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from rnn_sparsify.codegen.toolchain import have_tvm
from rnn_sparsify.target import EXIT_CODES

pytestmark = pytest.mark.slow

EXE = shutil.which("rnn-sparsify", path=os.path.dirname(sys.executable)) or shutil.which("rnn-sparsify")


def _toolchain() -> bool:
    from rnn_sparsify.codegen.errors import ToolchainMissing
    from rnn_sparsify.codegen.toolchain import nvcc_path

    try:
        nvcc_path()
    except ToolchainMissing:
        return False
    return have_tvm()


BUILD = 0 if _toolchain() else 8  # compile of a good target: built, or "TVM/nvcc missing"
GPU = torch.cuda.is_available()

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class LM(nn.Module):
        """embedding -> dropout -> 2-layer LSTM -> linear (the README's language model)"""
        def __init__(self, vocab=20, size=8):
            super().__init__()
            self.emb = nn.Embedding(vocab, size)
            self.drop = nn.Dropout(0.5)
            self.lstm = nn.LSTM(size, size, num_layers=2)
            self.out = nn.Linear(size, vocab)

        def forward(self, tokens, scale=1.0):
            y, _ = self.lstm(self.drop(self.emb(tokens)))
            return self.out(y) * scale

    def make():
        return LM()

    def make_pair():
        return LM(), (torch.randint(0, 20, (3, 2)),)

    def make_triple():
        return LM(), (torch.randint(0, 20, (3, 2)),), {"scale": 2.0}

    def make_bad_inputs():
        return LM(), (torch.randn(2, 2),)  # floats where token ids go

    def make_raises():
        raise RuntimeError("factory failed on purpose")

    def make_no_lstm():
        return nn.Linear(4, 4)
''')

# case -> {command: (arguments, expected exit code) or None}; {m} = a model target
SMALL = ["--arch", "sm_90", "--batch", "2", "--seq-len", "3", "--dtype", "float16", "-q"]
COMPILE_FLAGS = ["--p-input", "0.5"]


def _cases():
    def per_command(target, inspect=0, compile_=BUILD, bench=8, env=0, flags=COMPILE_FLAGS):
        return {
            "inspect": (["inspect", target], inspect),
            "compile": (["compile", "-o", "bundle", "--model", target, *SMALL, *flags], compile_),
            "bench": (["bench", "--bundle", "fake_bundle", "--out", "b.md", "--model", target, "--reps", "1"], bench),
            "env": (["env", target], env),
        }

    def loader_only(target, code, compile_=None):
        # the loader is one function for every command: extra target forms on two commands
        return {**per_command(target, code, code if compile_ is None else compile_), "bench": None, "env": None}

    return {
        "good target": per_command("good.py:make"),
        "module:factory target": loader_only("good:make", 0, BUILD),
        "missing file": per_command("missing.py:make", 3, 3, 3, 3),
        "missing module": loader_only("missing_module:make", 3),
        "missing factory": per_command("good.py:nope", 3, 3, 3, 3),
        "no factory named": loader_only("good.py", 2),
        "factory raises": per_command("good.py:make_raises", 4, 4, 4, 4),
        "module import raises": loader_only("broken:make", 4),
        "tuple-returning factory": per_command("good.py:make_pair"),
        "triple-returning factory": loader_only("good.py:make_triple", 0, BUILD),
        "no LSTM in the model": per_command("good.py:make_no_lstm", 5, 5, 5, 5),
        "no kernel bundle": {"bench": (["bench", "--bundle", "no_such_bundle", "--config", "2x8"], 9),
                             "inspect": None, "compile": None, "env": None},
        "example inputs fail": {"inspect": (["inspect", "good.py:make_bad_inputs"], 6),
                                "compile": None, "bench": None, "env": None},
        "nothing to build": {"compile": (["compile", "-o", "bundle", "--model", "good.py:make", *SMALL], 7),
                             "inspect": None, "bench": None, "env": None},
        "bad probability": {
            "inspect": (["inspect", "good.py:make", "--config", '{"kind": "structured_dropout", "p_input": 1.5}'], 2),
            "compile": (["compile", "-o", "bundle", "--model", "good.py:make", *SMALL, "--p-input", "1.5"], 2),
            "bench": None, "env": None},
        "negative size": {
            "inspect": (["inspect", "good.py:make", "--batch-size", "-4", "--seq-len", "3"], 2),
            "compile": (["compile", "-o", "bundle", "--model", "good.py:make", *SMALL, "--batch", "-4"], 2),
            "bench": (["bench", "--bundle", "fake_bundle", "--seq-len", "-4"], 2),
            "env": None},
        "unknown arch / dtype / gate": {
            "inspect": (["inspect", "good.py:make", "--format", "svg"], 2),
            "compile": (["compile", "-o", "bundle", "--model", "good.py:make", *SMALL, "--gate", "coarse:P=x"], 2),
            "bench": (["bench", "--bundle", "fake_bundle", "--dtype", "int8"], 2),
            "env": None},
        "-o into a missing folder": {
            "inspect": (["inspect", "good.py:make", "-o", "new/dir/report.txt"], 0),
            "compile": (["compile", "-o", "new/dir/bundle", "--model", "good.py:make", *SMALL, *COMPILE_FLAGS], BUILD),
            "bench": (["bench", "--bundle", "fake_bundle", "--out", "new/dir/b.md", "--config", "2x8"], 8),
            "env": (["env", "-o", "new/dir/env.txt"], 0)},
    }


CASES = _cases()
TABLE = [(case, cmd) for case, cmds in CASES.items() for cmd in ("inspect", "compile", "bench", "env")
         if cmds.get(cmd) is not None]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "good.py").write_text(MODEL)
    (d / "broken.py").write_text("import torch\nraise ValueError('broken on import')\n")
    (d / "fake_bundle").mkdir()
    (d / "fake_bundle" / "manifest.json").write_text("{}")  # bench checks the bundle, the model, then the GPU
    return d


def run_cli(args, cwd, env_extra=None, timeout=300):
    assert EXE, "the rnn-sparsify console script is not installed (pip install -e .)"
    env = {**os.environ, "RNN_SPARSIFY_CACHE": str(cwd / "kernel_cache")}
    env.pop("PYTHONPATH", None)  # a newcomer's shell: only the current folder
    env.update(env_extra or {})
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("case, command", TABLE, ids=[f"{c}-{m}" for c, m in TABLE])
def test_contract(workdir, case, command):
    args, expected = CASES[case][command]
    if command == "bench" and expected == 8 and GPU:
        pytest.skip("this machine has a GPU: bench would run (the GPU check covers it)")
    r = run_cli(args, workdir)
    assert expected in EXIT_CODES
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == expected, (r.returncode, r.stderr)
    if expected != 0:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith(f"rnn-sparsify {command}"), lines[0]
    if "-o" in args and expected == 0:
        assert (workdir / args[args.index("-o") + 1]).exists()


def test_messages_name_the_option_and_range(workdir):
    r = run_cli(["compile", "-o", "b", "--model", "good.py:make", *SMALL, "--p-input", "1.5"], workdir)
    assert "--p-input" in r.stderr and "[0, 1)" in r.stderr
    r = run_cli(["inspect", "good.py:make", "--batch-size", "-4", "--seq-len", "3"], workdir)
    assert "--batch-size" in r.stderr and "> 0" in r.stderr
    r = run_cli(["compile", "-o", "b", "--model", "good.py:make", *SMALL[:1], "sm_70", *SMALL[2:]], workdir)
    assert r.returncode == 2 and "--arch" in r.stderr and "sm_80 or newer" in r.stderr


def test_nothing_to_build_says_why_and_what_to_pass(workdir):
    r = run_cli(["compile", "-o", "nothing/bundle", "--model", "good.py:make", *SMALL], workdir)
    assert r.returncode == 7
    assert "lstm: dense" in r.stderr and "--p-input" in r.stderr and "sparsify" in r.stderr
    assert not (workdir / "nothing").exists()  # nothing written when nothing is built


@pytest.mark.skipif(BUILD != 0, reason="needs TVM and nvcc (the tvm extra); the contract table checks exit 8")
def test_compile_from_model_lists_every_lstm(workdir):
    r = run_cli(["compile", "-o", "lm_bundle", "--model", "good.py:make_pair", *SMALL, "--p-recurrent", "0.5"], workdir)
    assert r.returncode == 0, r.stderr
    from rnn_sparsify.codegen.manifest import Manifest

    m = Manifest.load(workdir / "lm_bundle")
    assert [(l["name"], l["num_layers"], l["seq_len"]) for l in m.lstms] == [("lstm", 2, 3)]
    assert "lstm" in r.stdout and "kernels" in r.stdout


def test_env_reports_the_installation(workdir):
    r = run_cli(["env", "good.py:make"], workdir)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for word in ("torch:", "TVM:", "nvcc:", "GPU", "vector ISA:", "kernel cache:", "lstm (nn.LSTM, float32) on cpu:"):
        assert word in out, (word, out)
    assert f"torch: {torch.__version__}" in out


def test_internal_error_says_so_and_where_to_report(monkeypatch, capsys):
    from rnn_sparsify import cli

    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "run_inspect", boom)
    assert cli.main(["inspect", "x.py:make"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "internal error" in err and "ZeroDivisionError" in err and "report it" in err and "Traceback" not in err
    assert cli.main(["inspect", "x.py:make", "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err  # --verbose: the traceback for the bug report
