"""Hand-written cell matching: accepted forms (three gate orders, LayerNorm) and refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from rnn_sparsify.passes.match_cell import match_lstm_cells
from rnn_sparsify.passes.rewrite import build_region
from rnn_sparsify.passes.trace import trace_module
from tests.models.cases import CellCatFIOG, CellIFGO, CellSliceGIFO, LayerNormCell

I, H, N = 5, 4, 3


def _call(cell, x, h, c):
    if isinstance(cell, CellCatFIOG):
        return cell(x, h, c)
    out = cell(x, (h, c))
    return (out[1][0], out[1][1]) if isinstance(cell, LayerNormCell) else out


@pytest.mark.parametrize("cls, order, norms", [
    (CellIFGO, "ifgo", 0), (CellCatFIOG, "fiog", 0), (CellSliceGIFO, "gifo", 0), (LayerNormCell, "ifgo", 3),
])
def test_accepted_cells(cls, order, norms):
    cell = cls(I, H).double()
    gm = trace_module(cell)
    (m,), refused = match_lstm_cells(gm)
    assert not refused
    assert (m.gate_order, m.input_size, m.hidden_size, len(m.norms)) == (order, I, H, norms)
    region = build_region(gm, m)
    x, h, c = torch.randn(N, I, dtype=torch.float64), torch.randn(N, H, dtype=torch.float64), torch.randn(N, H, dtype=torch.float64)
    params = [gm.get_parameter(t) for t in region.param_targets]
    ref = _call(cell, x, h, c)
    got = region.dense(x, h, c, *params)
    torch.testing.assert_close(got, tuple(ref), rtol=0, atol=0)  # the same ops: bitwise
    if not norms:  # the weights rearranged for nn.LSTMCell give the same cell
        p = region.lstm_cell_params(params)
        lstm = nn.LSTMCell(I, H, bias="bias_ih" in p).double()
        got = torch.func.functional_call(lstm, p, (x, (h, c)))
        # (i,f,g,o) row permutation + summed biases: same math, different summation order
        torch.testing.assert_close(got, tuple(ref), rtol=1e-12, atol=1e-12)
    else:
        assert region.canonical is None


class ForgetBias(CellIFGO):
    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, 1)
        c = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class LeakyGate(CellIFGO):
    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, 1)
        i = torch.sigmoid(i)
        c = torch.sigmoid(f) * c + i * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c, i  # the input gate escapes


class Ambiguous(nn.Module):  # x and h of equal width, unnamed, not next to c
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(H, 4 * H), nn.Linear(H, 4 * H)

    def forward(self, c, u, v):
        i, f, g, o = (self.a(u) + self.b(v)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class ChunkDim0(CellIFGO):
    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, 0)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class NamedH(nn.Module):  # forward(x, c, h): found by name, not by position
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(H, 4 * H), nn.Linear(H, 4 * H)

    def forward(self, x, c, h):
        i, f, g, o = (self.a(x) + self.b(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def test_h_found_by_name():
    (m,), _ = match_lstm_cells(trace_module(NamedH()))
    assert (m.h.name, m.x.name, m.how_h_found) == ("h", "x", "h is named 'h'")


@pytest.mark.parametrize("cls, reason", [
    (ForgetBias, "gate f: add_1 is not a slice of a gate pre-activation"),
    (LeakyGate, "intermediate sigmoid is also used outside the cell (by output)"),
    (Ambiguous, "cannot tell the input x from the hidden state h"),
    (ChunkDim0, "chunks dim 0, not the feature dimension"),
])
def test_refusals_say_why(cls, reason):
    cell = cls(I, H) if cls is not Ambiguous else cls()
    matches, refused = match_lstm_cells(trace_module(cell))
    assert not matches
    assert len(refused) == 1 and reason in refused[0].reason, refused


def test_no_cell_no_networkx_work():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    assert match_lstm_cells(gm) == ([], [])


def test_two_unrolled_steps_are_two_cells():
    class TwoSteps(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = CellIFGO(I, H)

        def forward(self, x0, x1, h, c):
            h, c = self.cell(x0, (h, c))
            return self.cell(x1, (h, c))

    gm = trace_module(TwoSteps())
    matches, _ = match_lstm_cells(gm)
    assert [m.scope for m in matches] == ["cell", "cell"]
    assert matches[1].h is matches[0].h_out  # step 2 reads step 1's h'
