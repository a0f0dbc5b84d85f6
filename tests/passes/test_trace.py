"""The degrading tracer: untraceable modules stay opaque, their children are still traced."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnn_sparsify.passes.trace import trace_degrading
from tests.models.cases import case


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a traced value
            return self.lin(x)
        return x


class Parent(nn.Module):
    """Its own forward traces once the untraceable child is a leaf."""

    def __init__(self):
        super().__init__()
        self.bad = DataDependent()
        self.good = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.lstm = nn.LSTM(4, 4)

    def forward(self, x):
        return self.lstm(self.good(self.bad(x)))[0]


class Raises(nn.Module):
    def forward(self, x):
        raise KeyError("anything at all")


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 4)

    def forward(self, x):
        if self.training:
            x = x * 2
        return F.dropout(self.lstm(x)[0], 0.5, self.training)


def test_untraceable_child_becomes_a_leaf_of_its_traced_parent():
    tr = trace_degrading(Parent())
    assert set(tr.graphs) == {"", "bad.lin"}  # the opaque child's own children are traced alone
    assert tr.graphs[""].leaves == ["bad"]
    assert "TraceError" in tr.details["bad"] or "symbolically traced" in tr.details["bad"]
    # the reason is in the user's terms: the construct, the file and line, what to do
    assert "control flow" in tr.opaque["bad"] and "test_trace.py:18 `if x.sum() > 0:" in tr.opaque["bad"]
    assert "Traced" not in tr.opaque["bad"] and "torch.where" in tr.opaque["bad"]
    assert tr.leaves["lstm"] == "" and tr.leaves["bad"] == ""
    assert tr.inlined["good"] == "" and tr.inlined["good.0"] == ""
    assert tr.graphs[""].mode_independent


def test_untraceable_root_keeps_traced_children():
    m, _ = case("cell_ifgo_linear_chunk").factory()
    tr = trace_degrading(m)
    assert "" in tr.opaque and "Proxy" in tr.details[""] and "Proxy" not in tr.opaque[""]
    assert "cases.py:" in tr.opaque[""] and "module swap" in tr.opaque[""]
    assert set(tr.graphs) == {"cell", "head"}


def test_never_raises_and_reports_every_failure():
    tr = trace_degrading(nn.Sequential(Raises(), nn.LSTM(2, 2)))
    assert tr.details["0"].startswith("KeyError")
    assert "test_trace.py:38 `raise KeyError" in tr.opaque["0"]
    assert "" in tr.graphs  # Sequential traces with the failing child as a leaf


def test_scripted_module_is_recorded_not_traced():
    m, _ = case("torchscript_submodule").factory()
    tr = trace_degrading(m)
    assert "enc" in tr.scripted and "TorchScript" in tr.scripted["enc"]
    assert tr.leaves["enc"] == ""


def test_forward_branching_on_training_is_not_rewritable():
    tr = trace_degrading(ModeDependent())
    g = tr.graphs[""]
    assert not g.mode_independent and "self.training" in g.mode_reason


def test_functional_dropout_reads_training_at_run_time():
    tr = trace_degrading(case("dropout_before_and_between").factory()[0])
    code = tr.graphs[""].gm.code
    assert "training = self.training" in code and "training = True" not in code


class LiteralFlags(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 4)

    def forward(self, x):
        x = F.dropout(x, 0.3, training=False)  # literal: never active
        x = F.dropout(x, 0.5)  # literal default True: active in eval too
        x = F.dropout(x, 0.2, self.training)  # follows the mode
        return self.lstm(x)[0]


def test_only_dropouts_written_with_self_training_read_it_at_run_time():
    tr = trace_degrading(LiteralFlags())
    nodes = [n for n in tr.graphs[""].gm.graph.nodes if n.op == "call_function" and n.target is F.dropout]
    flags = [n.kwargs["training"] for n in nodes]
    assert flags[0] is False and flags[1] is True
    assert getattr(flags[2], "op", None) == "get_attr" and flags[2].target == "training"


class Mutating(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.seen = []
        self.register_buffer("steps", torch.zeros(()))
        self.lstm = nn.LSTM(4, 4)

    def forward(self, x):
        self.calls += 1
        self.seen.append(1)
        self.steps.add_(1)
        return self.lstm(x)[0]


def test_a_forward_that_changes_python_state_is_opaque_and_the_state_restored():
    m = Mutating()
    tr = trace_degrading(m)
    assert "" in tr.opaque and "Python state" in tr.opaque[""] and "calls" in tr.opaque[""]
    assert m.calls == 0 and m.seen == [] and float(m.steps) == 0.0
