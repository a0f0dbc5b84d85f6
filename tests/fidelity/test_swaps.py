"""Issue 10, items 2 and 3: module swaps for any nn.LSTM subclass, and crash containment
(an error while handling one LSTM skips that LSTM, reported, never the whole model)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rnn_sparsify import SparseLSTM, StructuredDropout, sparsify
from tests.fidelity.models import MixinLSTM, SlottedLSTM

SD = StructuredDropout(0.25, 0.25)
T, B, I, H = 5, 3, 6, 8


class FinalLSTM(nn.LSTM):
    """Refuses to be subclassed: the re-classing swap cannot build its sparse class."""

    def __init_subclass__(cls, **kwargs):
        raise TypeError(f"{cls.__name__}: FinalLSTM is final")

    def forward(self, x):
        return super().forward(x)[0]


class Zoo(nn.Module):
    def __init__(self, first: type = MixinLSTM):
        super().__init__()
        self.a = first(I, H, batch_first=True)
        self.b = SlottedLSTM(H, H, batch_first=True)
        self.b.tag = "kept"
        self.c = nn.LSTM(H, H, batch_first=True)

    def forward(self, x, lengths):
        y = self.a(x, lengths) if isinstance(self.a, MixinLSTM) else self.a(x)
        return self.c(self.b(y))[0]


def _inputs():
    lengths = torch.tensor([T, 2, 4])
    return torch.randn(B, T, I, dtype=torch.float64), lengths


def _quiet_sparsify(*a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify(*a, **k)


def test_abstract_mixin_and_slots_subclasses_are_swapped():
    m = Zoo().double()
    sp = _quiet_sparsify(m, SD)
    rep = sp.rnn_sparsify_report
    assert [rep[n].handling for n in "abc"] == ["module swap"] * 3
    assert isinstance(sp.a, MixinLSTM) and isinstance(sp.a, SparseLSTM) and sp.a.describe() == "SparseMixinLSTM(6->8)"
    assert isinstance(sp.b, SlottedLSTM) and sp.b.tag == "kept"
    x, lengths = _inputs()
    m.eval(), sp.eval()
    assert torch.equal(sp(x, lengths), m(x, lengths))
    sp.train()
    sp(x, lengths).sum().backward()
    assert sp.a.last_path == "sparse" and sp.b.last_path == "sparse"
    assert all(torch.isfinite(p.grad).all() for p in sp.parameters())
    import io  # the dynamic classes pickle (rebuilt on load)

    buf = io.BytesIO()
    torch.save(sp, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    back.eval()
    assert torch.equal(back(x, lengths), m(x, lengths))
    assert type(back.a).__name__ == "SparseMixinLSTM"


def test_an_lstm_that_cannot_be_swapped_is_skipped_with_the_error_and_the_rest_handled():
    m = Zoo(first=FinalLSTM).double()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sp = _quiet_sparsify(m, SD)
    rep = sp.rnn_sparsify_report
    assert rep["a"].handling == "skipped" and "FinalLSTM is final" in rep["a"].reason
    assert rep["b"].handling == "module swap" and rep["c"].handling == "module swap"
    assert type(sp.a) is FinalLSTM and not hasattr(sp.a, "structured_dropout")
    x, lengths = _inputs()
    m.eval(), sp.eval()
    assert torch.equal(sp(x, lengths), m(x, lengths))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # caller's model untouched
    assert type(m.b) is SlottedLSTM and type(m.c) is nn.LSTM


def test_sparsify_raises_only_when_nothing_could_be_handled():
    m = nn.Sequential(FinalLSTM(I, H))
    with pytest.raises(RuntimeError, match="no LSTM could be handled.*FinalLSTM is final"):
        _quiet_sparsify(m, SD)
    assert type(m[0]) is FinalLSTM


def test_a_failed_weight_sparsity_attach_restores_the_module():
    from rnn_sparsify import WeightSparsity
    import rnn_sparsify.weight_sparsity as ws

    m = nn.Sequential(nn.LSTM(I, H), nn.LSTM(H, H))
    real = ws.attach_weight_sparsity
    calls = []

    def flaky(module, config, *, name=""):
        calls.append(name)
        real(module, config, name=name)
        if name == "1":
            raise RuntimeError("disk full")  # after the masks were attached: must be undone

    ws.attach_weight_sparsity = flaky
    try:
        sp = _quiet_sparsify(m, WeightSparsity.dst(100, 0.5))
    finally:
        ws.attach_weight_sparsity = real
    rep = sp.rnn_sparsify_report
    assert calls == ["0", "1"]
    assert rep["0"].handling == "module swap" and rep["1"].handling == "skipped" and "disk full" in rep["1"].reason
    assert type(sp[1]) is nn.LSTM and not hasattr(sp[1], "weight_hh_l0_mask")
    assert set(sp[1].state_dict()) == set(m[1].state_dict())
    assert all(torch.equal(v, m[1].state_dict()[k]) for k, v in sp[1].state_dict().items())  # no weight zeroed
    assert not sp[1]._forward_pre_hooks
