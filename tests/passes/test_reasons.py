"""LSTM-like cells the matcher sees but does not accept are listed, with the gate it stopped at,
the user's file:line, and what to do; untraceable code is explained in the user's terms."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rnn_sparsify.passes.dot import to_dot
from rnn_sparsify.sparsify import SKIPPED, inspect_model


class Coupled3(nn.Module):
    """Gates chunked in three, forget gate coupled to the input gate (f = 1 - i)."""

    def __init__(self, n=8):
        super().__init__()
        self.ih, self.hh = nn.Linear(n, 3 * n), nn.Linear(n, 3 * n)

    def forward(self, x, state):
        h, c = state
        i, g, o = (self.ih(x) + self.hh(h)).chunk(3, -1)
        i = torch.sigmoid(i)
        c = (1 - i) * c + i * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c) + x  # and a residual term
        return h, c


class InnerTerm(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.ih, self.hh = nn.Linear(n, 4 * n), nn.Linear(n, 4 * n)

    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * (torch.tanh(c) + x)
        return h, c


class ReluOut(InnerTerm):
    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.relu(o) * torch.tanh(c)
        return h, c


class ResidualOutside(InnerTerm):
    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c) + x, c  # the cell is standard; the residual stays outside


class Loop(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, xs):
        h = c = xs.new_zeros(xs.shape[1], 8)
        for t in range(xs.shape[0]):
            h, c = self.cell(xs[t], (h, c))
        return h


class ZerosState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.lstm(x)[0]


@pytest.mark.parametrize("cell, words", [
    (Coupled3, ("forget gate f", "not a sigmoid", "chunk(3)", "test_reasons.py:24")),
    (InnerTerm, ("hidden output h'", "plus another term", "test_reasons.py:38")),
    (ReluOut, ("output gate o", "relu", "test_reasons.py:47")),
])
def test_variant_is_a_candidate_with_the_gate_it_stopped_at(cell, words):
    rep = inspect_model(Loop(cell()))  # was NoLSTMFoundError, without a word
    (e,) = rep.lstms
    assert e.kind == "hand-written cell (candidate)" and e.handling == SKIPPED
    for w in words:
        assert w in e.reason, (w, e.reason)
    assert "Done instead" in e.reason and "What you can do" in e.reason


def test_standard_cell_with_residual_outside_is_rewritten():
    rep = inspect_model(Loop(ResidualOutside()))
    assert [e.handling for e in rep.lstms] == ["graph rewrite"]


def test_untraceable_reason_in_user_terms_raw_text_in_details():
    rep = inspect_model(ZerosState())
    why = rep.untraceable[""]
    assert "control flow" in why and "test_reasons.py:77 `if x.sum() > 0:`" in why
    assert "module swap" in why and "torch.where" in why
    assert "symbolically traced" not in why and "symbolically traced" in rep.details["<root>"]
    assert rep.to_dict()["details"] == rep.details
    assert "if x.sum() > 0" in rep["lstm"].reason  # the LSTM's row says what stopped the rewrite


def test_dot_label_of_an_untraceable_module_is_complete():
    dot = to_dot(ZerosState())
    label = next(line for line in dot.splitlines() if '"opaque:' in line and "label=" in line)
    text = label.split("label=", 1)[1].replace("\\n", " ")
    assert "What you can do:" in text and "torch.where" in text  # the whole reason, wrapped


def test_dropout_next_to_an_lstm_in_untraceable_code_is_listed():
    from tests.models.cases import case

    from rnn_sparsify import StructuredDropout

    m, _ = case("packed_unsorted").factory()
    rep = inspect_model(m, StructuredDropout(0.25))
    (d,) = [d for d in rep.dropouts if d["node"] == "drop"]
    assert not d["fused"] and d["target"] == "lstm" and "cannot be traced" in d["reason"]
    assert "What you can do" in d["reason"]
    assert "dropout drop not fused into lstm" in rep.table()


def test_lstm_row_names_the_line_that_calls_it():
    from tests.models.cases import case

    rep = inspect_model(case("dropout_before_and_between").factory()[0])
    assert "cases.py:" in rep["lstm1"].reason and "cases.py:" in rep["lstm2"].reason


def test_table_never_cuts_a_module_path():
    name = "an_encoder_with_a_really_quite_long_descriptive_name"
    m = nn.Module()
    m.add_module(name, nn.LSTM(4, 4))
    m.forward = lambda x: getattr(m, name)(x)[0]
    assert name in inspect_model(m).table()


class ZerosOfShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(4, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[1], 4)
        return self.cell(x[0], (h, h))[0]


class NumpyShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 4)

    def forward(self, x):
        import numpy as np

        return self.lstm(x[: np.asarray(x).shape[0]])[0]


@pytest.mark.parametrize("model, construct, line", [
    (ZerosOfShape, "a tensor value used where Python needs a plain number", "h = torch.zeros(x.shape[1], 4)"),
    (NumpyShape, "a call that needs real tensor data", "np.asarray(x)"),
])
def test_untraceable_constructs_are_named(model, construct, line):
    rep = inspect_model(model())
    why = rep.untraceable[""]
    assert construct in why and line in why and "test_reasons.py:" in why
    assert "Proxy" not in why and "__array" not in why and rep.details["<root>"]
