"""find_lstms: every kind of site, with locations and refusals."""
from __future__ import annotations

from torch import nn

from rnn_sparsify import SparseLSTM
from rnn_sparsify.passes.find_lstm import find_lstms
from rnn_sparsify.passes.trace import trace_degrading
from tests.models.cases import CASES, case


def _sites(model):
    return {s.fqn: s for s in find_lstms(model, trace_degrading(model))}


def test_every_case_site_is_found():
    for c in CASES:
        model, _ = c.factory()
        assert set(_sites(model)) == {e.fqn for e in c.expected}, c.name


def test_locations_and_kinds():
    s = _sites(case("packed_unsorted").factory()[0])["lstm"]
    assert s.location.startswith("inside untraceable <root>") and s.shapes["bidirectional"]
    s = _sites(case("proj_size").factory()[0])["lstm"]
    assert s.location.startswith("called from the traced graph of <root> at tests/models/cases.py:") and s.shapes["proj_size"] == 4
    s = _sites(case("cell_gifo_flinear_slices").factory()[0])["cell"]
    assert s.kind == "hand-written cell" and s.match.gate_order == "gifo" and s.node == "mul_2"
    s = _sites(case("torchscript_submodule").factory()[0])["enc"]
    assert s.refusal and "contains LSTMs at cell" in s.refusal


def test_aliases_and_already_sparse():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = SparseLSTM(3, 3)
            self.b = self.a

        def forward(self, x):
            return self.b(x)[0]

    (s,) = _sites(M()).values()
    assert s.aliases == ["b"] and "already sparse" in s.refusal
