"""Issue 12's reproductions, one test each (the invariant table in ``test_invariants.py``
runs the same models through every invariant; these pin the specific symptom)."""
from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rnn_sparsify import (
    DenseAfterSparse,
    GateGradientSparsity,
    GradualPruningScheduler,
    SparseLSTM,
    SparseLSTMCell,
    StructuredDropout,
    WeightSparsity,
    sparsify,
)
from tests.fidelity import models as fm
from tests.models.cases import make_cell_ifgo

SD = StructuredDropout(0.25, 0.25)
GGS = GateGradientSparsity.coarse(P=4, R=8, S=4)


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# 1 ---------------------------------------------------------------------------------------
def test_frozen_lstm_stays_frozen_and_an_optimizer_step_leaves_it():
    m, (x,) = fm.make_frozen()
    sp = sparsify(m, SD)
    assert not any(p.requires_grad for p in sp.lstm.parameters())
    before = {k: v.clone() for k, v in sp.lstm.state_dict().items()}
    opt = torch.optim.SGD([p for p in sp.parameters() if p.requires_grad], lr=0.5)
    sp.train()
    sp(x).sum().backward()
    opt.step()
    for k, v in sp.lstm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_from_dense_copies_requires_grad():
    lstm = nn.LSTM(4, 8)
    lstm.weight_hh_l0.requires_grad_(False)
    sp = SparseLSTM.from_dense(lstm, SD)
    assert not sp.weight_hh_l0.requires_grad and sp.weight_ih_l0.requires_grad
    cell = nn.LSTMCell(4, 8).requires_grad_(False)
    assert not any(p.requires_grad for p in SparseLSTMCell.from_dense(cell).parameters())
    assert not any(p.requires_grad for p in SparseLSTMCell.from_dense(cell).to_dense().parameters())


# 2 ---------------------------------------------------------------------------------------
def test_forward_hook_on_the_lstm_still_runs():
    m, (x,) = fm.make_hooked()
    sp = sparsify(m, SD)
    m.eval(), sp.eval()
    assert torch.equal(sp(x), m(x))
    assert len(sp.lstm._forward_hooks) == 1


def test_custom_attribute_survives_the_swap():
    m, (x,) = fm.make_custom_attribute()
    sp = sparsify(m, SD)
    assert sp.lstm.out_scale == 0.5
    m.eval(), sp.eval()
    assert torch.equal(sp(x), m(x))


def test_tied_weight_stays_tied_through_training():
    m, (x,) = fm.make_tied()
    sp = sparsify(m, SD)
    assert sp.lstm.weight_ih_l0 is sp.proj.weight
    opt = torch.optim.SGD(sp.parameters(), lr=0.5)
    sp.train()
    sp(x).sum().backward()
    opt.step()
    assert sp.lstm.weight_ih_l0 is sp.proj.weight
    assert torch.equal(sp.lstm.weight_ih_l0, sp.proj.weight)


def test_lstm_held_in_a_plain_list_is_the_sparse_one():
    m, (x,) = fm.make_list_alias()
    sp = sparsify(m, SD)
    assert sp.stack[0] is sp.lstm and isinstance(sp.lstm, SparseLSTM)
    sp.train()
    sp(x)
    assert sp.lstm.last_path == "sparse"


def test_explicit_base_forward_call_is_reported_skipped_not_swapped():
    m, (x,) = fm.make_explicit_call()
    sp = sparsify(m, SD)
    e = sp.rnn_sparsify_report["lstm"]
    assert e.handling == "skipped" and "nn.LSTM.forward(self.lstm" in e.reason
    assert type(sp.lstm) is nn.LSTM


def test_swapped_model_pickles_and_keeps_the_list_alias():
    m, (x,) = fm.make_list_alias()
    sp = sparsify(m, SD)
    buf = io.BytesIO()
    torch.save(sp, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.stack[0] is back.lstm and isinstance(back.lstm, SparseLSTM)
    assert pickle.loads(pickle.dumps(sp.lstm)).structured_dropout == SD


# 3 ---------------------------------------------------------------------------------------
def test_disabled_functional_dropout_stays_disabled_in_training():
    m, (x,) = fm.make_disabled_dropouts()
    sp = sparsify(m, GGS)  # forward unchanged: training output must be the original's
    assert "" in sp.rnn_sparsify_report.graph_rewrites  # the hand-written cell: forward rewritten
    m.train(), sp.train()
    torch.testing.assert_close(sp(x), m(x), rtol=1e-10, atol=1e-12)


def test_disabled_functional_dropout_is_not_fused():
    m, (x,) = fm.make_disabled_dropouts()
    sp = sparsify(m, StructuredDropout(0.0, 0.25))
    assert sp.lstm.structured_dropout.p_input == 0.0
    assert not sp.rnn_sparsify_report["lstm"].fused_dropout


def test_always_on_functional_dropout_still_runs_in_eval():
    m, (x,) = fm.make_always_on_dropout()
    sp = sparsify(m, SD)
    assert sp.rnn_sparsify_report["lstm"].fused_dropout  # the nn.Dropout before it is fused
    m.eval(), sp.eval()
    torch.manual_seed(3)
    ref = m(x)
    torch.manual_seed(3)
    got = sp(x)
    assert torch.equal(got, ref) and bool((got == 0).any())


# 4 ---------------------------------------------------------------------------------------
def test_dropout_is_not_fused_into_an_lstm_called_twice():
    m, (x,) = fm.make_shared()
    sp = sparsify(m, StructuredDropout(0, 0))
    assert sp.lstm.structured_dropout.p_input == 0
    refused = [d for d in sp.rnn_sparsify_report.dropouts if not d["fused"]]
    assert refused and "called 2 times" in refused[0]["reason"]


# 5 ---------------------------------------------------------------------------------------
def test_python_state_is_not_run_by_tracing_and_keeps_counting():
    m, (x,) = fm.make_counting()
    sp = sparsify(m, SD)
    assert sp.calls == 0 and m.calls == 0
    sp.eval()
    sp(x)
    sp(x)
    assert sp.calls == 2
    assert "Python state" in sp.rnn_sparsify_report.untraceable[""]


def test_flag_changed_after_sparsify_is_seen():
    m, (x,) = fm.make_flagged()
    sp = sparsify(m, SD)
    assert "" in sp.rnn_sparsify_report.graph_rewrites  # the dropout was fused: forward rewritten
    m.use_head = sp.use_head = False
    m.eval(), sp.eval()
    with pytest.warns(UserWarning, match="use_head"):
        got = sp(x)
    assert torch.equal(got, m(x))


def test_sparsify_does_not_advance_the_global_rng():
    m, (x,) = fm.make_always_on_dropout()  # its forward draws even in eval
    torch.manual_seed(11)
    state = torch.get_rng_state()
    sparsify(m, SD, example_inputs=(x,))
    assert torch.equal(torch.get_rng_state(), state)


# 6 ---------------------------------------------------------------------------------------
def test_dense_after_sparse_switches_a_rewritten_hand_written_cell():
    m, (x,) = make_cell_ifgo(torch.float64)
    sp = sparsify(m, GGS)
    das = DenseAfterSparse(sp, total_steps=4, sparse_fraction=0.0)  # dense from the start
    assert das.targets
    m.train(), sp.train()
    m(x).pow(2).sum().backward()
    sp(x).pow(2).sum().backward()
    for (name, p), q in zip(m.named_parameters(), sp.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_sparsifying_a_rewritten_hand_written_cell_again_is_refused():
    m, (x,) = make_cell_ifgo(torch.float64)
    sp = sparsify(m, GGS)
    again = sparsify(sp, SD)
    rep = again.rnn_sparsify_report
    assert not rep.handled
    assert any("already sparse" in e.reason for e in rep.lstms)
    region = next(mod for name, mod in again.named_modules() if name.endswith("rnn_sparsify_cell_0"))
    assert region.gate_sparsity == GGS and region.structured_dropout is None


# 7 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("total_steps", [10, 20])
def test_short_paper_mode_schedule_is_refused(total_steps):
    with pytest.raises(ValueError, match="too short"):
        WeightSparsity.gradual(total_steps)


def test_an_update_that_prunes_a_whole_matrix_is_refused():
    m = nn.Sequential(nn.LSTM(8, 8))
    sp = sparsify(m, WeightSparsity.gradual(100, start_itr=1, ramp_itr=2, end_itr=3, freq=1, theta=100.0, phi=100.0))
    sched = GradualPruningScheduler(sp)
    with pytest.raises(ValueError, match="prune every weight"):
        for _ in range(3):
            sched.step()


# 8 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["attach", "sparsify"])
def test_mask_gradients_zero_for_parameters_unfrozen_after_attach(how):
    from rnn_sparsify import attach_weight_sparsity

    lstm = nn.LSTM(8, 8).requires_grad_(False)
    if how == "attach":
        attach_weight_sparsity(lstm, WeightSparsity.dst(100, 0.5))
    else:
        lstm = sparsify(nn.Sequential(lstm), WeightSparsity.dst(100, 0.5))[0]
    lstm.requires_grad_(True)
    lstm(torch.randn(3, 2, 8))[0].sum().backward()
    for name in ("weight_ih_l0", "weight_hh_l0"):
        grad, mask = getattr(lstm, name).grad, getattr(lstm, name + "_mask")
        assert grad.abs().sum() > 0 and not bool(grad[~mask].any()), name


# 9, 12 -----------------------------------------------------------------------------------
def _err(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


CELL_BAD = {
    "hx_more_rows": lambda: (torch.randn(2, 4), (torch.randn(3, 5), torch.randn(3, 5))),
    "c_more_rows": lambda: (torch.randn(2, 4), (torch.randn(2, 5), torch.randn(3, 5))),
    "input_size": lambda: (torch.randn(2, 8), None),
    "hidden_size": lambda: (torch.randn(2, 4), (torch.randn(2, 6), torch.randn(2, 5))),
    "input_3d": lambda: (torch.randn(2, 2, 4), None),
    "hx_3d": lambda: (torch.randn(2, 4), (torch.randn(2, 5), torch.randn(1, 2, 5))),
    "unbatched_hx_batched": lambda: (torch.randn(4), (torch.randn(2, 5), torch.randn(2, 5))),
}


@pytest.mark.parametrize("case", sorted(CELL_BAD))
def test_sparse_cell_training_errors_are_nn_lstmcells(case):
    dense = nn.LSTMCell(4, 5)
    sp = SparseLSTMCell.from_dense(dense, SD).train()
    x, hx = CELL_BAD[case]()
    ref = _err(lambda: dense(x, hx))
    assert ref is not None
    assert _err(lambda: sp(x, hx)) == ref


LSTM_BAD = {
    "empty_sequence": lambda: (torch.randn(0, 2, 4), None),
    "input_size": lambda: (torch.randn(3, 2, 7), None),
    "h0_batch": lambda: (torch.randn(3, 2, 4), (torch.randn(1, 3, 5), torch.randn(1, 3, 5))),
}


@pytest.mark.parametrize("case", sorted(LSTM_BAD))
def test_sparse_lstm_training_errors_are_nn_lstms(case):
    dense = nn.LSTM(4, 5)
    sp = SparseLSTM.from_dense(dense, SD).train()
    x, hx = LSTM_BAD[case]()
    ref = _err(lambda: dense(x, hx))
    assert ref is not None
    assert _err(lambda: sp(x, hx)) == ref


def test_packed_input_errors_are_nn_lstms():
    from torch.nn.utils.rnn import pack_padded_sequence

    dense = nn.LSTM(4, 5)
    sp = SparseLSTM.from_dense(dense, SD).train()
    packed = pack_padded_sequence(torch.randn(3, 2, 7), torch.tensor([3, 2]))
    ref = _err(lambda: dense(packed))
    assert ref is not None and _err(lambda: sp(packed)) == ref


# 11 --------------------------------------------------------------------------------------
def test_torchscript_advice_does_not_suggest_scripting_a_sparsified_model():
    from tests.models.cases import make_scripted

    m, _ = make_scripted()
    rep = _quiet(sparsify, m, SD).rnn_sparsify_report
    reason = rep["enc"].reason
    assert "before torch.jit.script" not in reason and "cannot themselves be scripted" in reason


# 13 --------------------------------------------------------------------------------------
def test_numpy_scalars_of_any_width_are_accepted_as_plain_numbers():
    for v in (np.float32(0.5), np.float64(0.5), np.float16(0.5)):
        sd = StructuredDropout(v)
        assert sd == StructuredDropout(0.5) and type(sd.p_input) is float
    assert GateGradientSparsity.coarse(P=np.int64(4)) == GateGradientSparsity.coarse(P=4)
    assert WeightSparsity.dst(np.int32(100), np.float32(0.5)).to_dict() == WeightSparsity.dst(100, 0.5).to_dict()


def test_unknown_kind_message_lists_every_kind():
    # a fresh interpreter: weight_sparsity not imported yet (as in the CLI)
    import subprocess
    import sys

    code = ("from rnn_sparsify import config_from_dict\n"
            "try:\n    config_from_dict({'kind': 'nope'})\nexcept ValueError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for kind in ("structured_dropout", "gate_gradient_sparsity", "weight_sparsity"):
        assert kind in out, out


class TwoSizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.LSTM(8, 8)
        self.b = nn.LSTM(8, 6)

    def forward(self, x):
        return self.b(self.a(x)[0])[0]


def test_weight_sparsity_block_that_does_not_fit_one_lstm_skips_only_that_one():
    sp = sparsify(TwoSizes(), WeightSparsity.dst(100, 0.5, block=(4, 4)))
    rep = sp.rnn_sparsify_report
    assert rep["a"].handling == "module swap" and hasattr(sp.a, "weight_ih_l0_mask")
    assert rep["b"].handling == "skipped" and "block" in rep["b"].reason
    assert type(sp.b) is nn.LSTM


# issue 10, item 1 (guarded graph forwards) -------------------------------------------------
def test_traced_forward_called_with_none_falls_back_to_the_original():
    m, (xs,) = fm.make_optional_state()
    sp = sparsify(m, SD)
    assert "rnn" in sp.rnn_sparsify_report.graph_rewrites
    m.eval(), sp.eval()
    with pytest.warns(UserWarning, match="'hx' is None"):
        got = sp(xs)
    assert torch.equal(got, m(xs))
    sp.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sp(xs)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in sp.parameters() if p.grad is not None)


class PackedOrPadded(nn.Module):
    """Traced with a Tensor; a PackedSequence would take another path through its code."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.lstm = nn.LSTM(6, 8)

    def forward(self, x):
        from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

        if isinstance(x, PackedSequence):  # traced with a Proxy: False, baked in
            return pad_packed_sequence(self.lstm(x)[0])[0]
        return self.lstm(self.drop(x))[0]


def test_argument_of_another_type_than_the_example_inputs_falls_back():
    from torch.nn.utils.rnn import pack_padded_sequence

    m = PackedOrPadded().double()
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    sp = sparsify(m, SD, example_inputs=(x,))
    assert "type differs" in sp.rnn_sparsify_report.graph_rewrites[""][-1]
    packed = pack_padded_sequence(x, torch.tensor([5, 4, 2]))
    m.eval(), sp.eval()
    assert torch.equal(sp(x), m(x))  # no warning: the traced pattern
    with pytest.warns(UserWarning, match="PackedSequence"):
        got = sp(packed)
    assert torch.equal(got, m(packed))


class OneStep(nn.Module):
    """Calls its traced child always without ``hx``."""

    def __init__(self):
        super().__init__()
        self.rnn = fm.OptionalState()

    def forward(self, xs):
        outs = [self.rnn(x)[0] for x in xs.unbind(0)]  # unbind: the root does not trace
        return torch.stack(outs)


def test_parameter_never_passed_by_the_example_inputs_is_traced_as_none():
    m = OneStep().double()
    xs = torch.randn(4, 3, 8, dtype=torch.float64)
    sp = sparsify(m, SD, example_inputs=(xs,))
    changes = sp.rnn_sparsify_report.graph_rewrites["rnn"]
    assert any("hx is given (traced as None)" in c for c in changes)
    m.eval(), sp.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the traced pattern: no fallback
        got = sp(xs)
    assert torch.equal(got, m(xs))
    hx = (torch.zeros(2, 3, 8, dtype=torch.float64),) * 2
    with pytest.warns(UserWarning, match="'hx' is given"):
        got = sp.rnn(xs[0], hx)
    torch.testing.assert_close(got, m.rnn(xs[0], hx), rtol=0, atol=0)
    sp.train()
    sp(xs).sum().backward()
    assert sp.rnn.cells[1].last_path == "sparse"


# issue 10, item 5 (verification pass) -------------------------------------------------------
def test_verification_undoes_a_rewrite_that_changes_eval_outputs(monkeypatch):
    from rnn_sparsify.passes.rewrite import SparseCellRegion

    m, (x,) = fm.make_disabled_dropouts()  # a hand-written cell: the root forward is rewritten
    sp = sparsify(m, GGS, example_inputs=(x,))
    assert sp.rnn_sparsify_report.verification == {"checked": ["<root>"], "reverted": {}}
    real = SparseCellRegion.forward

    def broken(self, *args):  # a wrong rewrite: the cell's output off by 1e-3
        h, c = real(self, *args)
        return h + 1e-3, c

    monkeypatch.setattr(SparseCellRegion, "forward", broken)
    with pytest.warns(RuntimeWarning, match="verification"):
        sp = sparsify(m, GGS, example_inputs=(x,))
    rep = sp.rnn_sparsify_report
    assert "<root>" in rep.verification["reverted"] and "" not in rep.graph_rewrites
    assert rep["cell"].handling == "skipped" and "verification" in rep["cell"].reason
    assert rep["lstm"].handling == "module swap"
    assert not any("rnn_sparsify_cell" in n for n, _ in sp.named_modules())
    m.eval(), sp.eval()
    assert torch.equal(sp(x), m(x))


# issue 10, item 4: a hand-written layer in untraceable code, without example inputs (reported;
# with example inputs it is captured: tests/fidelity/test_captured_layers.py) ----------------
class LNLayer(nn.Module):
    """A LayerNorm-LSTM layer looped in Python (issue 10, reproduction 3)."""

    def __init__(self, inp=6, hidden=8):
        super().__init__()
        self.x2g = nn.Linear(inp, 4 * hidden)
        self.p2g = nn.Linear(hidden, 4 * hidden, bias=False)
        self.g_norm = nn.LayerNorm(4 * hidden)
        self.c_norm = nn.LayerNorm(hidden)
        self.hidden = hidden

    def forward(self, x):
        gated = self.x2g(x)
        h = x.new_zeros(x.shape[1], self.hidden)
        c = torch.zeros_like(h)
        outs = []
        for g in gated.unbind(0):
            g = self.g_norm(g + self.p2g(h))
            i, f, u, o = g.chunk(4, 1)
            c = self.c_norm(f.sigmoid() * c + i.sigmoid() * u.tanh())
            h = o.sigmoid() * c.tanh()
            outs.append(h)
        return torch.stack(outs)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = LNLayer()
        self.lstm = nn.LSTM(8, 8)

    def forward(self, x):
        y = self.layer(x)
        if y.mean() > 0:  # data-dependent control flow: the root does not trace
            y = -y
        return self.lstm(y)[0]


def test_hand_written_layer_in_untraceable_code_is_reported_where_it_is():
    from rnn_sparsify.sparsify import NoLSTMFoundError

    sp = sparsify(DataDependent(), SD)
    rep = sp.rnn_sparsify_report
    assert rep["layer"].kind == "hand-written LSTM layer (probable)" and rep["layer"].handling == "skipped"
    assert rep["lstm"].handling == "module swap"
    with pytest.raises(NoLSTMFoundError, match="reads like a hand-written LSTM layer"):
        sparsify(nn.Sequential(LNLayer()), SD)
