"""The eval rule list of a weight-sparse SparseLSTM (``rnn_sparsify/kernels/eval_rules.py``):
CUDA persistent kernels -> CPU sparse eval kernels -> nn.LSTM, the first that applies wins,
each other rule says why; what ``rnn-sparsify env`` prints about it."""
import warnings

import pytest
import torch
from torch import nn

from rnn_sparsify.kernels import eval_rules as er
from rnn_sparsify.kernels import persistent_eval as pe

from .test_persistent_eval import _pruned


def _dense_copy(m):
    ref = nn.LSTM(m.input_size, m.hidden_size, m.num_layers, bidirectional=m.bidirectional,
                  batch_first=m.batch_first).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.endswith("_mask")})
    return ref


def test_the_rules_in_order():
    assert [n for n, _ in er.EVAL_RULES] == [er.PERSISTENT, er.CPU_SPARSE]
    assert er.PERSISTENT == pe.BACKEND


def test_first_rule_that_applies_wins_and_the_others_say_why(monkeypatch):
    m = _pruned(5, 8)
    x = torch.randn(3, 2, 5)
    marker = (torch.full((3, 2, 8), 7.0), (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)))
    calls = []

    def no(name):
        return lambda mod, inp, hx: calls.append(name) or (None, f"{name} does not apply")

    def yes(name):
        return lambda mod, inp, hx: calls.append(name) or (marker, None)

    monkeypatch.setattr(er, "EVAL_RULES", [("a", no("a")), ("b", yes("b")), ("c", yes("c"))])
    with torch.no_grad():
        out = m(x)
    assert out is marker and calls == ["a", "b"]  # "c" is never asked
    assert m.last_eval_backend == "b" and m.last_eval_reasons == [("a", "a does not apply"), ("b", "used")]
    monkeypatch.setattr(er, "EVAL_RULES", [("a", no("a")), ("b", no("b"))])
    with torch.no_grad():
        y, _ = m(x)
    assert m.last_path == "dense" and m.last_eval_backend == "nn.LSTM"
    assert m.last_eval_reasons[-1] == ("nn.LSTM", "used")
    assert m.last_eval_reason == "a: a does not apply; b: b does not apply"
    with torch.no_grad():
        torch.testing.assert_close(y.double(), _dense_copy(m)(x.double())[0], rtol=0, atol=1e-5)


def test_cpu_input_with_gradients_runs_nn_lstm_and_says_why_per_rule():
    m = _pruned(5, 8)
    x = torch.randn(4, 3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "runs eval on the dense nn.LSTM path"
        y, _ = m(x)  # gradients enabled: no sparse eval kernel applies
    assert m.last_path == "dense" and m.last_eval_backend == "nn.LSTM"
    (r1, w1), (r2, w2), (r3, w3) = m.last_eval_reasons
    assert (r1, r2, r3, w3) == (er.PERSISTENT, er.CPU_SPARSE, "nn.LSTM", "used")
    assert "not on CUDA" in w1 and "gradients are needed" in w2
    assert "gradients are needed" in m.last_eval_reason  # as before the rule list
    torch.testing.assert_close(y.detach().double(), _dense_copy(m)(x.double())[0], rtol=0, atol=1e-5)


@pytest.mark.tvm
def test_persistent_rule_runs_through_forward_on_the_twin(tvm, monkeypatch):
    """SparseLSTM.forward in eval() reaches the persistent kernels through the rule list (CUDA
    stood in for: the device checks pass, the kernels are the CPU twins) and matches float64."""
    from rnn_sparsify.codegen.persistent_sparse import PersistentSparseSpec

    from .test_persistent_eval import _TwinKernels

    I, H, B, T = 6, 13, 2, 4
    m = _pruned(I, H, sparsity=0.7, seed=5)
    nnz = pe.row_nnz_max(m.weight_hh_l0)
    kernels = _TwinKernels([PersistentSparseSpec.make(H, 2, nnz, "float32", 2)])
    monkeypatch.setattr(er, "_on_cuda", lambda inp: True)
    monkeypatch.setattr(pe, "why_not_static", lambda *a: None)
    monkeypatch.setattr(pe, "_kernels_for", lambda dev: kernels)
    monkeypatch.setenv(pe.MODE_ENV_VAR, "always")  # the kernels themselves (routing: test_eval_routing.py)
    x = torch.randn(T, B, I)
    with torch.no_grad():
        y, (hn, cn) = m(x)
    assert m.last_path == "persistent_eval" and m.last_eval_backend == er.PERSISTENT
    assert m.last_eval_reasons == [(er.PERSISTENT, "used")] and kernels.launches == 1
    with torch.no_grad():
        ref, (rh, rc) = _dense_copy(m)(x.double())
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=3e-5)
    torch.testing.assert_close(hn.double(), rh, rtol=0, atol=3e-5)
    # no kernel for this batch: the persistent rule says so, the CPU rule that the input is on
    # CUDA, and nn.LSTM runs
    with torch.no_grad():
        m(torch.randn(T, 5, I))
    assert m.last_path == "dense"
    assert "no persistent kernel" in dict(m.last_eval_reasons)[er.PERSISTENT]
    assert "on CUDA" in dict(m.last_eval_reasons)[er.CPU_SPARSE]


def test_explain_lists_the_rules_with_the_cuda_conditions(tmp_path, monkeypatch):
    monkeypatch.setattr(pe, "_config", {"path": None})
    monkeypatch.delenv(pe.ENV_VAR, raising=False)
    m = _pruned(12, 16, sparsity=0.9)
    nnz = pe.row_nnz_max(m.weight_hh_l0)
    text = er.explain(m)
    i1, i2, i3 = (text.index(s) for s in (f"1. {er.PERSISTENT}", f"2. {er.CPU_SPARSE}", "3. nn.LSTM"))
    assert i1 < i2 < i3
    cuda = er.explain_cuda(m)
    for cond in ("no_grad", "without autocast", "padded or packed", "--persistent-eval", "hidden size 16",
                 f">= {nnz} non-zeros per gate row", "co-resident", "none in use"):
        assert cond in cuda, cond
    pe.use_bundle(tmp_path)
    try:
        assert f"the bundle {tmp_path}" in er.explain_cuda(m)
    finally:
        pe.use_bundle(None)
    assert er.explain(nn.LSTM(3, 4)) == "eval() runs nn.LSTM (no weight sparsity)"
    assert "proj_size" in er.explain_cuda(_pruned(6, 8, proj_size=4))


def test_env_report_states_the_eval_rule_list(tmp_path):
    from rnn_sparsify.cli import env_report

    (tmp_path / "pruned.py").write_text(
        "from rnn_sparsify import SparseLSTM\n"
        "from rnn_sparsify.weight_sparsity import WeightSparsity, attach_weight_sparsity\n"
        "def make():\n"
        "    m = SparseLSTM(12, 16)\n"
        "    attach_weight_sparsity(m, WeightSparsity('dst', total_steps=10, target_sparsity=0.9, weights=('hh',)))\n"
        "    return m\n")
    text = env_report(f"{tmp_path / 'pruned.py'}:make")
    (line,) = [ln for ln in text.splitlines() if "eval() rules, first that applies" in ln]
    assert f"1. {er.PERSISTENT}: eval() on CUDA" in line and f"2. {er.CPU_SPARSE}" in line
