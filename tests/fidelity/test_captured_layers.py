"""Issue 10, item 4: hand-written LSTM layers in code torch.fx cannot trace, captured by running
them on the example inputs (reproduction 3 and variants). Model code is our own."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from rnn_sparsify import StructuredDropout, inspect_model, sparsify
from rnn_sparsify.passes.capture import LAYER_KIND
from rnn_sparsify.passes.find_lstm import PROBABLE_LAYER
from rnn_sparsify.passes.rewrite import SparseCellRegion

SD = StructuredDropout(0.25, 0.25)
T, B, H = 5, 3, 8


class LoopLayer(nn.Module):
    """A LayerNorm-LSTM layer looped in Python (issue 10, reproduction 3); ``norm=False`` is the
    plain LSTM layer, ``order`` the position of the gates in the chunk."""

    def __init__(self, inp=6, hidden=H, norm=True, order="ifgo"):
        super().__init__()
        self.x2g = nn.Linear(inp, 4 * hidden)
        self.p2g = nn.Linear(hidden, 4 * hidden, bias=False)
        self.g_norm = nn.LayerNorm(4 * hidden) if norm else nn.Identity()
        self.c_norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.hidden, self.order = hidden, order

    def forward(self, x):
        gated = self.x2g(x)
        h = x.new_zeros(x.shape[1], self.hidden)
        c = torch.zeros_like(h)
        outs = []
        for g in gated.unbind(0):
            g = self.g_norm(g + self.p2g(h))
            gates = dict(zip(self.order, g.chunk(4, 1)))
            i, f, u, o = gates["i"], gates["f"], gates["g"], gates["o"]
            c = self.c_norm(f.sigmoid() * c + i.sigmoid() * u.tanh())
            h = o.sigmoid() * c.tanh()
            outs.append(h)
        return torch.stack(outs), (h, c)


class DataDependent(nn.Module):
    """Uses the layer in a forward with data-dependent control flow (fx cannot trace it)."""

    def __init__(self, **kw):
        super().__init__()
        self.layer = LoopLayer(**kw)
        self.lstm = nn.LSTM(H, H)

    def forward(self, x):
        y, (h, c) = self.layer(x)
        if y.mean() > 0:  # data-dependent: the root stays opaque
            y = -y
        return self.lstm(y)[0] + h


VARIANTS = [  # (norm, gate order, input size): input size == hidden needs the recurrence to tell h from x
    pytest.param(True, "ifgo", 6, id="layernorm-ifgo"),
    pytest.param(True, "igfo", H, id="layernorm-igfo-I=H"),
    pytest.param(False, "ifgo", H, id="plain-ifgo-I=H"),
    pytest.param(False, "igfo", 6, id="plain-igfo"),
]


def _build(norm, order, inp):
    torch.manual_seed(0)
    m = DataDependent(inp=inp, norm=norm, order=order)
    return m, torch.randn(T, B, inp)


def _quiet(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify(*a, **kw)


@pytest.mark.parametrize("norm,order,inp", VARIANTS)
def test_captured_layer_is_rewritten_and_keeps_the_original_numbers(norm, order, inp):
    m, x = _build(norm, order, inp)
    snapshot = {k: v.clone() for k, v in m.state_dict().items()}
    sp = _quiet(m, SD, example_inputs=(x,))
    rep = sp.rnn_sparsify_report

    # reported, with what was matched
    e = rep["layer"]
    assert e.kind == LAYER_KIND and e.handling == "graph rewrite", e.reason
    assert e.shapes["gate_order"] == order and e.shapes["hidden_size"] == H and e.shapes["input_size"] == inp
    assert bool(e.shapes["normalisation"]) == norm
    assert f"{T} time steps unrolled" in e.reason and "captured by running it" in e.reason
    assert rep["lstm"].handling == "module swap"
    assert "layer" in rep.graph_rewrites and rep.verification["reverted"] == {}

    # the caller's model is untouched
    assert type(m.layer) is LoopLayer and type(m.lstm) is nn.LSTM
    assert not any("rnn_sparsify" in n for n, _ in m.named_modules())
    assert all(torch.equal(v, snapshot[k]) for k, v in m.state_dict().items())

    # eval(): the original outputs on fresh inputs, also of another length
    m.eval(), sp.eval()
    with torch.no_grad():
        for shape in ((T, B, inp), (T + 2, B + 1, inp)):
            xf = torch.randn(*shape)
            assert torch.allclose(sp(xf), m(xf), atol=1e-6)

    # training: the sparse cell at every step, finite gradients for every parameter
    sp.train()
    xf = torch.randn(T, B, inp)
    sp(xf).pow(2).sum().backward()
    region = sp.layer.rnn_sparsify_cell_0
    assert isinstance(region, SparseCellRegion) and region.last_path == "sparse"
    assert region.structured_dropout == SD
    for name, p in sp.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in sp.layer.parameters())

    # state_dict both ways, same keys
    assert list(sp.state_dict()) == list(m.state_dict())
    fresh = DataDependent(inp=inp, norm=norm, order=order)
    fresh.load_state_dict(sp.state_dict())
    sp.load_state_dict(m.state_dict())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sp.state_dict().items())


@pytest.mark.parametrize("norm,order,inp", VARIANTS)
def test_captured_graph_computes_the_layer_in_training(norm, order, inp):
    """With the configs switched off after sparsify, training mode runs the captured graph
    (its cells on their dense path): outputs and gradients are the original layer's."""
    m, x = _build(norm, order, inp)
    sp = _quiet(m, SD, example_inputs=(x,))
    region = sp.layer.rnn_sparsify_cell_0
    region.structured_dropout = None
    xf = torch.randn(T, B, inp)
    m.train(), sp.train()
    ref, got = m.layer(xf)[0], sp.layer(xf)[0]
    assert region.last_path == "dense"  # the captured graph ran (the layer's own forward has no region)
    assert torch.allclose(got, ref, atol=1e-6)
    ref.pow(2).sum().backward()
    got.pow(2).sum().backward()
    for (n, p), q in zip(m.layer.named_parameters(), sp.layer.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n


def test_a_training_call_of_another_shape_runs_the_layers_own_forward_with_a_warning():
    m, x = _build(True, "ifgo", 6)
    sp = _quiet(m, SD, example_inputs=(x,))
    sp.train()
    region = sp.layer.rnn_sparsify_cell_0
    region.last_path = None
    with pytest.warns(UserWarning, match="captured"):
        out = sp(torch.randn(T + 1, B, 6))
    assert region.last_path is None and torch.isfinite(out).all()


def test_example_kwargs_capture_the_layer_too():
    m, x = _build(False, "ifgo", 6)
    sp = _quiet(m, SD, example_kwargs={"x": x})
    assert sp.rnn_sparsify_report["layer"].handling == "graph rewrite"


def test_captured_model_pickles_and_deep_copies():
    m, x = _build(True, "igfo", 6)
    sp = _quiet(m, SD, example_inputs=(x,))
    buf = io.BytesIO()
    torch.save(sp, buf)
    buf.seek(0)
    for back in (torch.load(buf, weights_only=False), copy.deepcopy(sp)):
        back.eval(), m.eval()
        xf = torch.randn(T, B, 6)
        with torch.no_grad():
            assert torch.allclose(back(xf), m(xf), atol=1e-6)
        back.train()
        back(xf).sum().backward()
        assert back.layer.rnn_sparsify_cell_0.last_path == "sparse"


def test_without_example_inputs_the_layer_is_reported_with_what_would_capture_it():
    m, _ = _build(True, "ifgo", 6)
    rep = inspect_model(m, SD)
    e = rep["layer"]
    assert e.kind == PROBABLE_LAYER and e.handling == "skipped"
    assert "example_inputs=" in e.reason and "reads like a hand-written LSTM layer" in e.reason


class BranchyLayer(LoopLayer):
    def forward(self, x):
        gated = self.x2g(x)
        h = x.new_zeros(x.shape[1], self.hidden)
        c = torch.zeros_like(h)
        outs = []
        for g in gated.unbind(0):
            i, f, u, o = (g + self.p2g(h)).chunk(4, 1)
            c = f.sigmoid() * c + i.sigmoid() * u.tanh()
            h = o.sigmoid() * c.tanh()
            if h.sum() > 0:  # data-dependent inside the layer: a recording would bake one branch
                h = h * 0.5
            outs.append(h)
        return torch.stack(outs), (h, c)


class CoupledLayer(LoopLayer):
    """Coupled input/forget gates (f = 1 - i): not an LSTM cell."""

    def forward(self, x):
        gated = self.x2g(x)
        h = x.new_zeros(x.shape[1], self.hidden)
        c = torch.zeros_like(h)
        outs = []
        for g in gated.unbind(0):
            g = g + self.p2g(h)
            i, f, u, o = g.chunk(4, 1)
            i = i.sigmoid()
            c = (1 - i) * c + i * u.tanh()
            h = o.sigmoid() * c.tanh()
            outs.append(h)
        return torch.stack(outs), (h, c)


@pytest.mark.parametrize("cls,why", [(BranchyLayer, "data-dependent Python code inside the layer (__bool__"),
                                     (CoupledLayer, "not an LSTM cell the matcher accepts")])
def test_layers_that_cannot_be_captured_are_refused_with_the_reason(cls, why):
    torch.manual_seed(0)
    m = DataDependent(norm=False)
    m.layer = cls(norm=False)
    x = torch.randn(T, B, 6)
    sp = _quiet(m, SD, example_inputs=(x,))
    e = sp.rnn_sparsify_report["layer"]
    assert e.handling == "skipped" and e.kind == PROBABLE_LAYER
    assert "captured by running it on the example inputs but not rewritten" in e.reason and why in e.reason, e.reason
    assert type(sp.layer) is cls and sp.rnn_sparsify_report["lstm"].handling == "module swap"
    m.eval(), sp.eval()
    with torch.no_grad():
        assert torch.allclose(sp(x), m(x), atol=1e-6)


def test_a_capture_whose_graph_differs_from_the_layer_is_not_installed(monkeypatch):
    m, x = _build(True, "ifgo", 6)
    real = SparseCellRegion.forward

    def broken(self, *args):  # a wrong rewrite: the cell's output off by 1e-3
        h, c = real(self, *args)
        return h + 1e-3, c

    monkeypatch.setattr(SparseCellRegion, "forward", broken)
    sp = _quiet(m, SD, example_inputs=(x,))
    e = sp.rnn_sparsify_report["layer"]
    assert e.handling == "skipped" and "outputs differ from the layer's own" in e.reason
    assert type(sp.layer) is LoopLayer and not hasattr(sp.layer, "rnn_sparsify_cell_0")
    assert "layer" not in sp.rnn_sparsify_report.graph_rewrites
