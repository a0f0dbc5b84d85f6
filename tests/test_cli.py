"""The rnn-sparsify console script, run as a newcomer would (subprocess), and its Python API."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from rnn_sparsify.cli import FactoryError, ModelSpecError, NoLSTMError, load_factory, main, run_inspect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = "tests/models/cases.py"
EXE = shutil.which("rnn-sparsify", path=os.path.dirname(sys.executable)) or shutil.which("rnn-sparsify")


def _run(*args):
    assert EXE, "the rnn-sparsify console script is not installed (pip install -e .)"
    return subprocess.run([EXE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_inspect_table_and_json(tmp_path):
    r = _run("inspect", f"{CASES}:make_cell_ifgo",
             "--config", '{"kind": "structured_dropout", "p_input": 0.25, "p_recurrent": 0.25}')
    assert r.returncode == 0, r.stderr
    assert "hand-written cell" in r.stdout and "graph rewrite" in r.stdout and "GEMM FLOPs" in r.stdout
    out = tmp_path / "report.json"
    r = _run("inspect", "tests.models.cases:make_packed", "--format", "json", "-o", str(out),
             "--batch-size", "32", "--seq-len", "50")
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["applied"] is False and rep["lstms"][0]["handling"] == "module swap"
    assert rep["flops"]["batch_size"] == 32 and "" in rep["untraceable"]


def test_inspect_dot_highlights_lstms():
    r = _run("inspect", f"{CASES}:make_dropout_stack", "--format", "dot")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("digraph") and 'fillcolor="lightblue"' in r.stdout and 'fillcolor="khaki"' in r.stdout


@pytest.mark.parametrize("spec, code, msg", [
    ("missing/file.py:make", 3, "no such file: missing/file.py"),
    (f"{CASES}:make_raises", 4, "raised RuntimeError: factory failed on purpose"),
    (f"{CASES}:make_no_lstm", 5, "no nn.LSTM, nn.LSTMCell"),
])
def test_exit_codes(spec, code, msg):
    r = _run("inspect", spec)
    assert r.returncode == code and msg in r.stderr and "hint:" in r.stderr, (r.returncode, r.stderr)


def test_python_api_matches_cli(capsys):
    with pytest.raises(ModelSpecError, match="has no attribute 'nope'"):
        load_factory(f"{CASES}:nope")
    with pytest.raises(ModelSpecError, match="not 'path/to/file.py:factory'"):
        load_factory("no_colon")
    with pytest.raises(FactoryError):
        run_inspect(f"{CASES}:make_raises")
    with pytest.raises(NoLSTMError):
        run_inspect(f"{CASES}:make_no_lstm")
    text = run_inspect(f"{CASES}:make_scripted")
    assert "TorchScript module" in text and "skipped" in text
    assert main(["inspect", f"{CASES}:make_attention", "--no-inputs"]) == 0
    assert "decoder" in capsys.readouterr().out
    assert main(["inspect", f"{CASES}:make_attention", "--config", "{bad"]) == 2
