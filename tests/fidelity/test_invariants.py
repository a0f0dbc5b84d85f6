"""Fidelity table: every model case x every config x one list of invariants.

A sparsified model is the original model except where sparsity is intended (issue 12):

* ``caller_untouched``: ``sparsify`` leaves the caller's model as it was (values, flags,
  Python attributes, hooks, train mode) and the global RNG where it was;
* ``eval_equal``: ``eval()`` outputs equal the original's, bit for bit, on fresh inputs
  (forwards that draw random numbers are seeded the same);
* ``train_equal_outside_sparsity``: with only ``GateGradientSparsity`` (its forward is the
  dense one) the training output equals the original's: same dropout calls, same RNG draws;
* ``module_state_equal``: every module keeps its class (or a subclass), ``requires_grad``,
  hooks, plain attributes, buffers and train mode; the only intended attribute change is
  ``nn.LSTM.dropout`` -> 0 where ``StructuredDropout.p_input`` replaces it;
* ``errors_equal``: a malformed input raises the original's exception with its message, in
  ``train()`` and in ``eval()``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rnn_sparsify import GateGradientSparsity, StructuredDropout, sparsify
from tests.models.cases import CASES
from tests.fidelity.models import FIDELITY_CASES

MODEL_CASES = {c.name: (lambda f=c.factory: f(torch.float64)) for c in CASES}
MODEL_CASES.update(FIDELITY_CASES)

CONFIGS = {
    "structured_dropout": (StructuredDropout(0.25, 0.25),),
    "gate_sparsity": (GateGradientSparsity.coarse(P=4, R=8, S=4),),
}

PLAIN = (bool, int, float, str, type(None))


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _run(model, inputs, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [t.detach().clone() for t in _tensors(model(*inputs))]


def _snapshot(model: nn.Module) -> dict:
    """Everything the user can see of a model, independent of the code under test."""
    snap = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        snap[fqn] = {
            "type": type(m),
            "training": m.training,
            "attrs": {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, PLAIN)},
            "params": {k: (p.detach().clone(), p.requires_grad) for k, p in m.named_parameters(recurse=False)},
            "buffers": {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)},
            "hooks": (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                      len(getattr(m, "_backward_pre_hooks", {}))),
        }
    return snap


def _assert_same_snapshot(a: dict, b: dict, *, allow_dropout_zero: bool = False, subclass_ok: bool = False):
    assert a.keys() <= b.keys(), f"modules lost: {sorted(a.keys() - b.keys())}"
    for fqn, sa in a.items():
        sb = b[fqn]
        where = fqn or "<root>"
        if subclass_ok:
            assert issubclass(sb["type"], sa["type"]), f"{where}: {sb['type'].__name__} is not a {sa['type'].__name__}"
        else:
            assert sb["type"] is sa["type"], where
        assert sb["training"] == sa["training"], f"{where}: train mode"
        for k, v in sa["attrs"].items():
            if allow_dropout_zero and k == "dropout" and isinstance(sb["type"], type) and issubclass(sb["type"], nn.LSTM):
                assert sb["attrs"][k] in (v, 0.0), f"{where}.dropout"
                continue
            assert k in sb["attrs"] and sb["attrs"][k] == v, f"{where}.{k}: {sb['attrs'].get(k, '<missing>')!r} != {v!r}"
        assert sa["params"].keys() == sb["params"].keys(), f"{where}: parameters"
        for k, (v, rg) in sa["params"].items():
            assert sb["params"][k][1] == rg, f"{where}.{k}: requires_grad {sb['params'][k][1]} != {rg}"
            assert torch.equal(sb["params"][k][0], v), f"{where}.{k}: value"
        assert sa["buffers"].keys() == sb["buffers"].keys(), f"{where}: buffers"
        for k, v in sa["buffers"].items():
            assert torch.equal(sb["buffers"][k], v), f"{where}.{k}: buffer value"
        assert sb["hooks"] == sa["hooks"], f"{where}: hooks (forward, forward pre, backward, backward pre)"


def _build(case):
    torch.manual_seed(1234)
    model, inputs = MODEL_CASES[case]()
    return model, inputs


def _sparsify(model, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify(model, *CONFIGS[cfg])


CASE_IDS = sorted(MODEL_CASES)


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("case", CASE_IDS)
def test_caller_untouched(case, cfg):
    model, inputs = _build(case)
    before = _snapshot(model)
    rng = torch.get_rng_state()
    _sparsify(model, cfg)
    assert torch.equal(torch.get_rng_state(), rng), "sparsify advanced the global RNG"
    _assert_same_snapshot(before, _snapshot(model))


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("case", CASE_IDS)
def test_eval_equal(case, cfg):
    model, inputs = _build(case)
    sp = _sparsify(model, cfg)
    model.eval(), sp.eval()
    for _ in range(2):  # twice: state kept by the forward (counters) must evolve alike
        ref, got = _run(model, inputs), _run(sp, inputs)
        assert len(ref) == len(got)
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    _assert_same_snapshot(_snapshot(model), _snapshot(sp), allow_dropout_zero=True, subclass_ok=True)


@pytest.mark.parametrize("case", CASE_IDS)
def test_train_equal_outside_sparsity(case):
    """Gate-gradient sparsity leaves the forward as it is: same outputs, same dropout draws."""
    model, inputs = _build(case)
    sp = _sparsify(model, "gate_sparsity")
    model.train(), sp.train()
    ref, got = _run(model, inputs, seed=7), _run(sp, inputs, seed=7)
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)  # float64; sparse kernels sum in another order
    # and the RNG is where the original left it: the same number of draws
    torch.manual_seed(7)
    _run(model, inputs, seed=7)
    a = torch.rand(4)
    _run(sp, inputs, seed=7)
    b = torch.rand(4)
    assert torch.equal(a, b), "the sparsified forward draws a different amount of random numbers"


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("case", CASE_IDS)
def test_module_state_equal(case, cfg):
    model, inputs = _build(case)
    sp = _sparsify(model, cfg)
    _assert_same_snapshot(_snapshot(model), _snapshot(sp), allow_dropout_zero=cfg == "structured_dropout",
                          subclass_ok=True)
    for mode in (True, False):  # after a forward in either mode, too
        model.train(mode), sp.train(mode)
        _run(model, inputs), _run(sp, inputs)
        _assert_same_snapshot(_snapshot(model), _snapshot(sp), allow_dropout_zero=cfg == "structured_dropout",
                              subclass_ok=True)


def _malformed(inputs):
    """The inputs with one feature too many on the first floating-point input, or (token
    models) the first integer input out of the vocabulary."""
    for k, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            bad = torch.cat([x, x[..., :1]], -1)
            return inputs[:k] + (bad,) + inputs[k + 1:]
    return (inputs[0] + 1000,) + inputs[1:]


def _error(model, inputs):
    try:
        _run(model, inputs)
    except Exception as e:  # noqa: BLE001 - the exception is the result
        msg = str(e)
        if msg.startswith("The following operation failed in the TorchScript interpreter"):
            # a TorchScript submodule is copied by torch.jit.save/load: its traceback shows the
            # serialized code too; the error itself (last line) must be the same
            msg = msg.strip().splitlines()[-1]
        return type(e), msg
    return None


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("case", CASE_IDS)
def test_errors_equal(case, cfg):
    model, inputs = _build(case)
    bad = _malformed(inputs)
    sp = _sparsify(model, cfg)
    for mode in (True, False):
        model.train(mode), sp.train(mode)
        assert _error(sp, bad) == _error(model, bad), f"train={mode}"


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("case", CASE_IDS)
def test_state_dict_both_ways_and_a_finite_training_step(case, cfg):
    model, inputs = _build(case)
    sp = _sparsify(model, cfg)
    assert list(sp.state_dict()) == list(model.state_dict())
    other, _ = _build(case)  # same seed: same values; perturb to see the loads
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    sp.load_state_dict(other.state_dict(), strict=True)
    model.load_state_dict(sp.state_dict(), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    sp.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = sum(t.float().pow(2).sum() for t in _tensors(sp(*inputs)) if t.is_floating_point())
    loss.backward()
    grads = [p.grad for p in sp.parameters() if p.requires_grad]
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads if g is not None)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
