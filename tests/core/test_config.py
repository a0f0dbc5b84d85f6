from __future__ import annotations

import dataclasses

import pytest

from rnn_sparsify import GateGradientSparsity, SparseLSTM, SparseLSTMCell, StructuredDropout, config_from_dict
from rnn_sparsify.config import kept_count


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: StructuredDropout(p_input=1.0), "p_input"),
        (lambda: StructuredDropout(p_input=-0.1), "p_input"),
        (lambda: StructuredDropout(p_recurrent=1.5), "p_recurrent"),
        (lambda: StructuredDropout(p_recurrent=float("nan")), "p_recurrent"),
        (lambda: StructuredDropout(p_input="0.5"), "p_input"),
        (lambda: GateGradientSparsity.coarse(R=4, S=4), r"\.S"),
        (lambda: GateGradientSparsity.coarse(R=4, S=5), r"\.S"),
        (lambda: GateGradientSparsity.coarse(P=0), r"\.P"),
        (lambda: GateGradientSparsity.coarse(S=-1), r"\.S"),
        (lambda: GateGradientSparsity.fine(My=0), r"\.My"),
        (lambda: GateGradientSparsity.fine(K=-2), r"\.K"),
        (lambda: GateGradientSparsity.meprop(keep=0.0), r"\.keep"),
        (lambda: GateGradientSparsity.meprop(keep=1.2), r"\.keep"),
        (lambda: GateGradientSparsity(mode="topk"), r"\.mode"),
    ],
)
def test_bad_configs_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_p_not_dividing_4h_raises():
    with pytest.raises(ValueError, match=r"GateGradientSparsity\.P=3"):
        SparseLSTM(4, 5, gate_sparsity=GateGradientSparsity.coarse(P=3))
    with pytest.raises(ValueError, match=r"GateGradientSparsity\.Mx=6"):
        SparseLSTMCell(4, 5, gate_sparsity=GateGradientSparsity.fine(Mx=6))


def test_wrong_config_type_and_conflicting_dropout():
    with pytest.raises(TypeError, match="structured_dropout"):
        SparseLSTM(4, 8, structured_dropout=GateGradientSparsity())
    with pytest.raises(ValueError, match="p_input"):
        SparseLSTM(4, 8, num_layers=2, dropout=0.3, structured_dropout=StructuredDropout(0.2))


def test_configs_are_frozen_and_round_trip():
    for cfg in (StructuredDropout(0.5, 0.25), GateGradientSparsity.coarse(4, 8, 2), GateGradientSparsity.fine(8, 4, 2),
                GateGradientSparsity.meprop(0.3)):
        assert config_from_dict(cfg.to_dict()) == cfg
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.mode = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown config kind"):
        config_from_dict({"kind": "nope"})


def test_kept_count_is_exact_and_clamped():
    assert kept_count(10, 0.0) == 10
    assert kept_count(10, 0.5) == 5
    assert kept_count(650, 0.5) == 325
    assert kept_count(3, 0.99) == 1
    assert GateGradientSparsity.coarse(R=8, S=2).nominal_drop_fraction == 0.25
