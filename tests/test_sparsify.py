"""sparsify(): the model case table (tests/models/cases.py) crossed with invariants."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from rnn_sparsify import GateGradientSparsity, SparseLSTM, StructuredDropout, sparsify
from rnn_sparsify.sparsify import NoLSTMFoundError, flops_per_token, get_report, inspect_model
from tests.models.cases import CASES, ModelCase, case

CONFIGS = (StructuredDropout(0.25, 0.25), GateGradientSparsity.coarse(P=4, R=8, S=4))
IDS = [c.name for c in CASES]


def _build(c: ModelCase):
    torch.manual_seed(hash(c.name) % 1000)
    return c.factory(torch.float64)


@pytest.fixture(scope="module")
def built():
    """(original, inputs, sparsified) per case: sparsify once, check many invariants."""
    out = {}
    for c in CASES:
        m, inp = _build(c)
        snapshot = {k: v.clone() for k, v in m.state_dict().items()}
        s = sparsify(m, *CONFIGS, example_inputs=inp)
        out[c.name] = (m, inp, s, snapshot)
    return out


def _types(model):
    return {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_every_expected_lstm_is_reported(c, built):
    _, _, s, _ = built[c.name]
    rep = get_report(s)
    for exp in c.expected:
        e = rep[exp.fqn]
        assert e.kind.startswith(exp.kind), (e.kind, exp.kind)
        assert e.handling == exp.handling, (exp.fqn, e.handling, e.reason)
        assert e.reason, f"{exp.fqn}: empty reason"
        for word in exp.reason_has:
            assert word in e.reason, f"{exp.fqn}: {word!r} not in {e.reason!r}"
        if e.handling != "skipped":
            assert e.backend in ("reference", "tvm_cpu") and e.configs
            assert e.observed and e.observed["tokens"] > 0
    assert {e.fqn for e in rep.lstms} == {x.fqn for x in c.expected}
    for fqn in c.untraceable:
        assert fqn in rep.untraceable and rep.untraceable[fqn]
    assert set(rep.graph_rewrites) == set(c.rewritten)
    assert {e.fqn for e in rep.lstms if e.fused_dropout} == set(c.fused)


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_only_expected_modules_changed_and_caller_untouched(c, built):
    m, _, s, snapshot = built[c.name]
    changed = {x.fqn for x in c.expected if x.handling != "skipped"} | set(c.rewritten)
    before, after = _types(m), _types(s)
    for fqn, t in before.items():
        if any(fqn == p or fqn.startswith(p + ".") for p in ("enc",)) and c.name == "torchscript_submodule":
            continue  # scripted modules are copied through torch.jit.save/load (same code, new type)
        if fqn in changed:
            assert after[fqn] is not t and issubclass(after[fqn], t), fqn
        else:
            assert after[fqn] is t, fqn
    new = set(after) - set(before)
    assert all(n.rsplit(".", 1)[0] in c.rewritten or (n.count(".") == 0 and "" in c.rewritten) for n in new), new
    # the caller's model: same classes, same values
    assert all(type(mod).__module__ != "rnn_sparsify.modules" for mod in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert not hasattr(m, "rnn_sparsify_report")


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_eval_output_equals_original(c, built):
    m, _, s, _ = built[c.name]
    _, inp = c.factory(torch.float64)  # fresh inputs
    m.eval(), s.eval()
    with torch.no_grad():
        ref, got = m(*inp), s(*inp)
    # same ops on the same float64 tensors: bitwise equal today; 1e-12 leaves room for BLAS.
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_training_step_takes_the_sparse_path(c, built):
    m, inp = _build(c)  # fresh (deepcopy of a ScriptModule gives non-leaf parameters in torch 2.13)
    s = sparsify(m, *CONFIGS)
    s.train()
    torch.manual_seed(0)
    loss = s(*inp).pow(2).mean()
    loss.backward()
    params = dict(s.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    before = {k: p.detach().clone() for k, p in params.items()}
    torch.optim.SGD(s.parameters(), lr=0.1).step()
    assert any(not torch.equal(before[k], p) for k, p in params.items())
    paths = {n: mod.last_path for n, mod in s.named_modules() if hasattr(mod, "last_path") and n}
    assert paths and all(v == "sparse" for v in paths.values()), paths


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_state_dict_round_trips(c, built):
    m, _, s, _ = built[c.name]
    assert list(s.state_dict()) == list(m.state_dict()) or set(s.state_dict()) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(s.state_dict()[k], v), k
    other, _ = c.factory(torch.float64)  # different random weights
    s2 = copy.deepcopy(s)
    s2.load_state_dict(other.state_dict())
    back = copy.deepcopy(m)
    back.load_state_dict(s2.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_torch_save_load(c, built):
    m, _, s, _ = built[c.name]
    if c.name == "torchscript_submodule":  # torch cannot pickle a ScriptModule inside an eager one
        with pytest.raises(RuntimeError):
            torch.save(m, io.BytesIO())
        return
    buf = io.BytesIO()
    torch.save(s, buf)
    buf.seek(0)
    s3 = torch.load(buf, weights_only=False)
    assert type(s3).__name__ == type(s).__name__
    _, inp = c.factory(torch.float64)
    s3.eval(), s.eval()
    with torch.no_grad():
        torch.testing.assert_close(s3(*inp), s(*inp), rtol=0, atol=0)
    assert get_report(s3).to_dict() == get_report(s).to_dict()


# -- API details -------------------------------------------------------------------------
def test_config_dispatch_errors():
    m, _ = case("proj_size").factory()
    with pytest.raises(TypeError, match="unknown config type dict"):
        sparsify(m, {"p_input": 0.1})
    with pytest.raises(ValueError, match="two StructuredDropout"):
        sparsify(m, StructuredDropout(0.1), StructuredDropout(0.2))
    with pytest.raises(NoLSTMFoundError):
        sparsify(case("packed_unsorted").factory()[0].out, StructuredDropout(0.1))  # a Linear
    with pytest.raises(ValueError, match="example_inputs do not run"):
        sparsify(m, StructuredDropout(0.1), example_inputs=(torch.randn(2, 2),))


def test_filter_fn_and_bad_hidden_size_are_reported():
    m, _ = case("lstmcell_attention").factory()
    s = sparsify(m, StructuredDropout(0.2), filter_fn=lambda mod, fqn: fqn != "decoder")
    rep = get_report(s)
    assert rep["decoder"].handling == "skipped" and rep["decoder"].reason == "excluded by filter_fn"
    assert isinstance(s.encoder, SparseLSTM) and type(s.decoder) is nn.LSTMCell
    s = sparsify(m, GateGradientSparsity.coarse(P=3, R=8, S=4))  # 3 does not divide 4*8
    assert rep_reason(s, "encoder").startswith("GateGradientSparsity.P=3 does not divide")


def rep_reason(model, fqn):
    e = get_report(model)[fqn]
    assert e.handling == "skipped"
    return e.reason


def test_root_lstm_and_shared_module():
    lstm = nn.LSTM(4, 8)
    s = sparsify(lstm, StructuredDropout(0.1))
    assert isinstance(s, SparseLSTM) and type(lstm) is nn.LSTM

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.LSTM(4, 4)
            self.b = self.a  # the same module under two names

        def forward(self, x):
            return self.b(self.a(x)[0])[0]

    s = sparsify(Shared(), StructuredDropout(0.1))
    assert s.a is s.b and isinstance(s.a, SparseLSTM)
    assert [e.fqn for e in get_report(s).lstms] == ["a"]


def test_already_sparse_and_dropout_not_fused_without_config():
    s = sparsify(nn.Sequential(nn.LSTM(4, 4)), StructuredDropout(0.1))
    again = sparsify(s, StructuredDropout(0.1))
    assert "already sparse" in get_report(again)["0"].reason
    m, _ = case("dropout_before_and_between").factory()
    rep = inspect_model(m, GateGradientSparsity.meprop(0.5))
    assert not rep.graph_rewrites
    assert {d["reason"] for d in rep.dropouts} == {
        "no StructuredDropout config given (fusing changes dropout to structured NR)"}


def test_fused_dropout_probability():
    m, _ = case("dropout_before_and_between").factory()
    s = sparsify(m, StructuredDropout(0.0, 0.1))  # p_input 0: each LSTM keeps the model's own p
    assert s.lstm1.structured_dropout == StructuredDropout(0.25, 0.1)
    assert s.lstm2.structured_dropout == StructuredDropout(0.3, 0.1)
    assert "dropout" not in s.__dict__["_rnn_sparsify_src"]  # both dropout calls are gone


def test_flops_per_phase_hand_computed():
    shapes = {"input_size": 6, "hidden_size": 8}
    f = flops_per_token(shapes, StructuredDropout(0.5, 0.25), GateGradientSparsity.meprop(0.5), batch=4)
    # kx = 3/6, kh = 6/8, 4H = 32: forward 2*32*(3 + 6) = 576 of 2*32*14 = 896; dnet keeps 16/32
    assert f["forward"] == {"dense": 896.0, "sparse": 576.0}
    assert f["backward_data"] == {"dense": 896.0, "sparse": 288.0}
    assert f["weight_gradient"] == {"dense": 896.0, "sparse": 288.0}
    m, _ = case("bidirectional_multilayer").factory()
    rep = inspect_model(m, StructuredDropout(0.5, 0.25))
    tot = rep.flops(batch_size=2, seq_len=10)["total"]
    assert 0 < tot["forward"]["saving"] < 1 and tot["backward_data"]["saving"] == tot["forward"]["saving"]


def test_weight_sparsity_is_attached_to_swapped_lstms():
    ws_mod = pytest.importorskip("rnn_sparsify.weight_sparsity")
    cfg = ws_mod.WeightSparsity.dst(total_steps=100, target_sparsity=0.5)
    m, _ = case("lstmcell_attention").factory()
    s = sparsify(m, cfg)
    rep = get_report(s)
    assert rep["encoder"].weight_sparsity["method"] == "dst"
    assert rep["decoder"].weight_sparsity is not None
