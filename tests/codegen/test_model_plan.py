"""compile --model's plan: every LSTM, LSTMCell and hand-written cell, built or listed with why."""
from __future__ import annotations

import pytest
from torch import nn

from rnn_sparsify import GateGradientSparsity, StructuredDropout
from rnn_sparsify.codegen.model_plan import plan_model
from rnn_sparsify.sparsify import NoLSTMFoundError, sparsify
from tests.models.cases import case


def _rows(plan):
    return {e.name: (e.kind, e.built) for e in plan.entries}


def test_flags_sparsify_a_dense_model_every_lstm_listed():
    m, _ = case("lstmcell_attention").factory()  # nn.LSTM encoder + nn.LSTMCell decoder loop
    plan = plan_model(m, 4, 5, "float16", structured_dropout=StructuredDropout(0.5, 0.5))
    assert _rows(plan) == {"encoder": ("SparseLSTM", True), "decoder": ("SparseLSTMCell", True)}
    specs = {s.name: s for s in plan.lstms}
    assert specs["encoder"].seq_len == 5 and specs["decoder"].seq_len == 1  # a cell: one step per call
    assert all(s.dtype == "float16" and s.batch == 4 for s in plan.lstms)


def test_configs_come_from_an_already_sparsified_model():
    m, _ = case("cell_ifgo_linear_chunk").factory()
    s = sparsify(m, StructuredDropout(0.0, 0.5))
    plan = plan_model(s, 4, 5)
    (spec,) = plan.lstms
    assert spec.structured_dropout == {"kind": "structured_dropout", "p_input": 0.0, "p_recurrent": 0.5}
    assert spec.seq_len == 1 and spec.dtype == "float32" and plan.entries[0].name == "cell"
    assert plan.entries[0].kind == "hand-written cell" and plan.entries[0].kernels == len(spec.gemms())


def test_nothing_to_build_is_said_per_lstm():
    m, _ = case("dropout_before_and_between").factory()
    plan = plan_model(m, 4, 5)  # dense, no flags
    assert plan.lstms == [] and all("dense" in e.reason and "--p-input" in e.reason for e in plan.entries)
    ln, _ = case("cell_layernorm").factory()
    plan = plan_model(ln, 4, 5, structured_dropout=StructuredDropout(0.5, 0.5))
    assert plan.lstms == [] and "normalisation" in plan.entries[0].reason


def test_skipped_and_refused_are_listed_with_the_reason():
    m, _ = case("lstm_subclass_explicit_base").factory()
    plan = plan_model(m, 4, 5, gate_sparsity=GateGradientSparsity.coarse())
    rows = {e.name: e for e in plan.entries}
    assert rows["ok"].built and not rows["rnn"].built and "super().forward" in rows["rnn"].reason
    m, _ = case("torchscript_submodule").factory()
    plan = plan_model(m, 4, 5, structured_dropout=StructuredDropout(0.5))
    rows = {e.name: e for e in plan.entries}
    assert not rows["enc"].built and "TorchScript" in rows["enc"].reason and rows["dec"].built


def test_no_lstm_raises():
    with pytest.raises(NoLSTMFoundError):
        plan_model(nn.Linear(3, 3), 2, 2, structured_dropout=StructuredDropout(0.5))
    with pytest.raises(NoLSTMFoundError):
        plan_model(nn.Linear(3, 3), 2, 2)


def test_a_dtype_without_kernels_asks_for_one():
    from rnn_sparsify.codegen.errors import UnsupportedGemm

    m = nn.Sequential(nn.LSTM(4, 4)).double()
    with pytest.raises(UnsupportedGemm, match="float64.*--dtype"):
        plan_model(m, 2, 3, structured_dropout=StructuredDropout(0.5))
    assert plan_model(m, 2, 3, "float16", structured_dropout=StructuredDropout(0.5)).lstms[0].dtype == "float16"
