"""rnn_sparsify.target: the one model loader of every command and the option validators."""
from __future__ import annotations

import argparse
import sys

import pytest
import torch
from torch import nn

from rnn_sparsify.target import (
    FactoryError, ModelSpecError, arch, config_json, gate_spec, load_model, model_target, positive_int, probability,
)

FACTORIES = '''
import torch
from torch import nn

def make():
    return nn.LSTM(4, 4)

def make_pair():
    return nn.LSTM(4, 4), torch.randn(3, 2, 4)

def make_triple():
    return nn.LSTM(4, 4), (torch.randn(3, 2, 4),), {"hx": None}

def make_bad_kwargs():
    return nn.LSTM(4, 4), (), [1]

def make_list():
    return [nn.LSTM(4, 4)]

lstm = nn.LSTM(2, 2)
'''


@pytest.fixture
def userdir(tmp_path, monkeypatch):
    (tmp_path / "facts.py").write_text(FACTORIES)
    (tmp_path / "imports_missing.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in ("facts", "imports_missing"):
        sys.modules.pop(name, None)


def test_target_forms_and_returns(userdir):
    assert isinstance(load_model("facts.py:make").module, nn.LSTM)
    pair = load_model("facts:make_pair")  # module form, from the current folder
    assert pair.example_inputs[0].shape == (3, 2, 4) and pair.example_kwargs is None  # one tensor -> a tuple
    triple = load_model(f"{userdir}/facts.py:make_triple")
    assert triple.example_kwargs == {"hx": None} and len(triple.example_inputs) == 1
    assert load_model("facts.py:lstm").module.input_size == 2  # a module object named directly
    torch.save(nn.Sequential(nn.LSTM(3, 3)), userdir / "m.pt")
    assert isinstance(load_model("m.pt").module[0], nn.LSTM)


def test_not_found_vs_the_models_code_failing(userdir):
    with pytest.raises(ModelSpecError, match="no such file"):
        load_model("nope.py:make")
    with pytest.raises(ModelSpecError, match="no module named 'nope_mod'"):
        load_model("nope_mod:make")
    with pytest.raises(ModelSpecError, match=r"has no attribute 'nope' \(it defines: make, make_bad_kwargs"):
        load_model("facts.py:nope")
    # the module exists but its own import fails: the same code (4) for both target forms
    with pytest.raises(FactoryError, match="no_such_dependency_xyz"):
        load_model("imports_missing:make")
    with pytest.raises(FactoryError, match="no_such_dependency_xyz"):
        load_model("imports_missing.py:make")
    with pytest.raises(FactoryError, match="returned list"):
        load_model("facts.py:make_list")
    with pytest.raises(FactoryError, match="example_kwargs of type list"):
        load_model("facts.py:make_bad_kwargs")
    with pytest.raises(ModelSpecError):
        load_model("missing.pt")


@pytest.mark.parametrize("fn, good, bad", [
    (probability, [("0", 0.0), ("0.5", 0.5)], ["1", "1.5", "-0.1", "x"]),
    (positive_int, [("1", 1), ("64", 64)], ["0", "-4", "2.5"]),
    (arch, [("sm_80", "sm_80"), ("sm_90a", "sm_90a")], ["sm_70", "90", "compute_90"]),
    (model_target, [("a.py:f", "a.py:f"), ("pkg.mod:f", "pkg.mod:f"), ("m.pt", "m.pt")], ["a.py", "a.py:", ":f"]),
])
def test_validators(fn, good, bad):
    for text, value in good:
        assert fn(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_gate_and_config_specs():
    assert gate_spec("coarse:P=4,R=8,S=2") == {"kind": "gate_gradient_sparsity", "mode": "coarse", "P": 4, "R": 8, "S": 2}
    assert gate_spec("meprop:keep=0.3")["keep"] == 0.3
    for bad in ("dense", "coarse:P=x", "coarse:Q=1", "coarse:S=8", "meprop:keep=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            gate_spec(bad)
    assert config_json('{"kind": "structured_dropout", "p_input": 0.25}').p_input == 0.25
    for bad in ("{bad", "[1]", '{"kind": "structured_dropout", "p_input": 1.5}', '{"kind": "nope"}'):
        with pytest.raises(argparse.ArgumentTypeError):
            config_json(bad)


def test_output_problems_are_found_before_any_work(tmp_path, capsys):
    from rnn_sparsify.cli import main
    from rnn_sparsify.target import output_problem

    (tmp_path / "file").write_text("")
    assert output_problem(str(tmp_path / "new" / "dir" / "r.json"), folder=False) is None  # created later
    assert "is a folder" in output_problem(str(tmp_path), folder=False)
    assert "is a file" in output_problem(str(tmp_path / "file" / "r.json"), folder=False)
    assert "not a folder" in output_problem(str(tmp_path / "file"), folder=True)
    # the model target does not exist either: the option is reported first (nothing loaded)
    assert main(["inspect", "missing.py:make", "-o", str(tmp_path)]) == 2
    assert "-o/--output" in capsys.readouterr().err
    assert main(["compile", "-o", str(tmp_path / "file"), "--model", "missing.py:make", "--arch", "sm_90",
                 "--batch", "2", "--seq-len", "3"]) == 2
    assert "-o/--out" in capsys.readouterr().err
