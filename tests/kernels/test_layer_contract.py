"""The layer-backend rule list and the TVM CPU backend end to end through SparseLSTM."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from rnn_sparsify import GateGradientSparsity, SparseLSTM, SparseLSTMCell, StructuredDropout
from rnn_sparsify.kernels import REFERENCE, layer
from rnn_sparsify.kernels.cpu_backend import TvmCpuLayerBackend, cpu_rule
from rnn_sparsify.kernels.layer import (
    ComposedLayerBackend,
    LayerBackend,
    LayerProblem,
    as_layer_backend,
    register_layer_rule,
    select_layer_backend,
    unregister_layer_rule,
)

from ._cpu_common import one_thread  # noqa: F401 - fixture
from ._cpu_common import RTOL, need_cpu_kernels, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
REF_VERDICT = ("per-step GEMMs (reference)", "used")
PT_VERDICT = ("persistent_train", "not a CUDA device")  # the GPU training loops' rule, listed on the CPU too


def prob(**kw):
    d = dict(device=CPU, dtype=torch.float32, input_size=24, hidden_size=20, batch=3, seq_len=5)
    d.update(kw)
    return LayerProblem(**d)


@pytest.fixture
def rules(monkeypatch):
    """A private copy of the rule list (restored afterwards)."""
    monkeypatch.setattr(layer, "_LAYER_RULES", list(layer._LAYER_RULES))
    return layer


# --------------------------------------------------------------------------------------
# rules and verdicts (no kernels needed)


def test_default_rule_list_has_tvm_cpu():
    assert "tvm_cpu" in [n for n, _ in layer._LAYER_RULES]


@pytest.mark.parametrize("kw, why", [
    (dict(dtype=torch.float64), "dtype torch.float64 (the CPU kernels are float32)"),
    (dict(dtype=torch.float16), "dtype torch.float16 (the CPU kernels are float32)"),
    (dict(device=torch.device("cuda", 0)), "cuda tensors (CPU kernels)"),
    (dict(device=torch.device("meta")), "meta tensors (CPU kernels)"),
    (dict(proj_size=5), "proj_size > 0 (no projection kernels)"),
    (dict(packed=True), "PackedSequence input (per-step batch sizes; no kernels for them)"),
])
def test_cpu_rule_declines_with_reason(kw, why):
    p = prob(**kw)
    assert cpu_rule(p) == why
    if p.device.type == "cpu":  # select_backend would look at CUDA rules for a cuda device
        be, verdicts = select_layer_backend(p)
        assert ("tvm_cpu", why) in verdicts
        assert verdicts[-1] == REF_VERDICT
        assert isinstance(be, ComposedLayerBackend) and be.gemm is REFERENCE


def test_switch_off_env(monkeypatch):
    monkeypatch.setenv("RNN_SPARSIFY_CPU_KERNELS", "0")
    be, verdicts = select_layer_backend(prob())
    assert verdicts == [("tvm_cpu", "switched off by RNN_SPARSIFY_CPU_KERNELS=0"), PT_VERDICT, REF_VERDICT]
    assert be.name == "reference"


def test_cpu_float32_selects_tvm_cpu():
    need_cpu_kernels()
    be, verdicts = select_layer_backend(prob(in_keep=12, rec_keep=10))
    assert isinstance(be, TvmCpuLayerBackend) and be.name == "tvm_cpu"
    assert verdicts == [("tvm_cpu", "used")]


def test_raising_rule_falls_through(rules):
    def boom(problem):
        raise ValueError("boom")

    register_layer_rule("broken", boom)  # first
    register_layer_rule("none", lambda p: None, first=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a broken rule is a verdict, not a warning or an error
        be, verdicts = select_layer_backend(prob(dtype=torch.float64))
    assert verdicts[0] == ("broken", "rule failed: ValueError: boom")
    assert ("none", "does not apply") in verdicts
    assert verdicts[-1] == REF_VERDICT
    assert be.name == "reference"


def test_register_replace_unregister(rules):
    class Mine(LayerBackend):
        name = "mine"

    mine = Mine()
    register_layer_rule("mine", lambda p: "not today")
    names = [n for n, _ in layer._LAYER_RULES]
    assert names[0] == "mine"
    _, verdicts = select_layer_backend(prob(dtype=torch.float64))
    assert verdicts[0] == ("mine", "not today")
    register_layer_rule("mine", lambda p: mine, first=False)  # replaces, now last
    names = [n for n, _ in layer._LAYER_RULES]
    assert names.count("mine") == 1 and names[-1] == "mine"
    be, verdicts = select_layer_backend(prob(dtype=torch.float64))
    assert be is mine and verdicts[-1] == ("mine", "used")
    unregister_layer_rule("mine")
    assert "mine" not in [n for n, _ in layer._LAYER_RULES]
    unregister_layer_rule("mine")  # unknown name: no error
    be, _ = select_layer_backend(prob(dtype=torch.float64))
    assert be.name == "reference"


def test_as_layer_backend_wraps_gemm_backend():
    comp = as_layer_backend(REFERENCE)
    assert isinstance(comp, ComposedLayerBackend) and comp.gemm is REFERENCE
    assert as_layer_backend(REFERENCE) is comp  # cached
    assert as_layer_backend(comp) is comp
    assert comp.name == REFERENCE.name


def test_gemm_backend_as_plan_backend():
    """A GEMM backend (not a LayerBackend) in plan.backend runs as the per-step composition."""
    from ._cpu_common import draw_masks, make_inputs, run_layer

    T, B, I, H = 4, 3, 6, 5
    inp = make_inputs(T, B, I, H, seed=3)
    masks = draw_masks(T, I, H, 0.5, 0.5, seed=4)
    a, _ = run_layer(REFERENCE, torch.float64, inp, masks, cfg=GateGradientSparsity.coarse())
    b, _ = run_layer(ComposedLayerBackend(REFERENCE), torch.float64, inp, masks,
                     cfg=GateGradientSparsity.coarse())
    for k in a:
        if a[k] is not None:
            assert torch.equal(a[k], b[k]), k


def test_custom_rule_backend_used_by_sparse_lstm(rules):
    """A registered rule's backend is what SparseLSTM runs (and reports)."""
    calls = []

    class Counting(ComposedLayerBackend):
        def forward(self, *a):
            calls.append("f")
            return super().forward(*a)

        def backward(self, *a):
            calls.append("b")
            return super().backward(*a)

    be = Counting(REFERENCE)
    be.name = "counting"
    register_layer_rule("counting", lambda p: be)
    m = SparseLSTM(6, 5, structured_dropout=StructuredDropout(0.5, 0.5)).train()
    out, _ = m(torch.randn(4, 2, 6))
    out.sum().backward()
    assert calls == ["f", "b"]
    assert m.last_backend == "counting" and m.last_backend_reasons == [("counting", "used")]


# --------------------------------------------------------------------------------------
# end to end through SparseLSTM (same masks: reseed before each run)


def _train_step(model, x, seed, hx=None):
    torch.manual_seed(seed)
    out, (h, c) = model(x, hx)
    g = torch.Generator().manual_seed(seed + 1)
    o = out.data if hasattr(out, "batch_sizes") else out
    loss = (o * torch.randn(o.shape, generator=g)).sum() + (h * torch.randn(h.shape, generator=g)).sum() \
        + (c * torch.randn(c.shape, generator=g)).sum()
    loss.backward()
    return o.detach(), h.detach(), c.detach()


def _compare_models(fast, ref, outs_fast, outs_ref, rtol=RTOL):
    # both float32: each within ~1e-6 of the exact values, so the difference too; see RTOL
    for a, b, n in zip(outs_fast, outs_ref, ("out", "h_n", "c_n")):
        assert rel_err(a, b) <= rtol, n
    pf, pr = dict(fast.named_parameters()), dict(ref.named_parameters())
    for n in pf:
        assert rel_err(pf[n].grad, pr[n].grad) <= rtol, n


@pytest.mark.parametrize("kind", ["2layer", "bidir_batch_first_coarse", "2layer_bidir_h0"])
def test_sparse_lstm_on_tvm_cpu_matches_reference(kind, monkeypatch):
    need_cpu_kernels()
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 24, 20
    sd = StructuredDropout(0.5, 0.5)
    hx = None
    if kind == "2layer":
        m = SparseLSTM(I, H, num_layers=2, structured_dropout=sd)
        x = torch.randn(T, B, I)
    elif kind == "bidir_batch_first_coarse":
        m = SparseLSTM(I, H, bidirectional=True, batch_first=True, structured_dropout=sd,
                       gate_sparsity=GateGradientSparsity.coarse())
        x = torch.randn(B, T, I)
    else:
        m = SparseLSTM(I, H, num_layers=2, bidirectional=True,
                       structured_dropout=StructuredDropout(0.0, 0.5))
        x = torch.randn(T, B, I)
        hx = (torch.randn(4, B, H) * 0.5, torch.randn(4, B, H) * 0.5)
    m.train()
    ref = copy.deepcopy(m)
    fast_out = _train_step(m, x, seed=123, hx=hx)
    assert m.last_path == "sparse"
    assert m.last_backend == "tvm_cpu"
    assert m.last_backend_reasons == [("tvm_cpu", "used")]

    monkeypatch.setenv("RNN_SPARSIFY_CPU_KERNELS", "0")
    ref_out = _train_step(ref, x, seed=123, hx=hx)
    assert ref.last_backend == "reference"
    assert ref.last_backend_reasons == [("tvm_cpu", "switched off by RNN_SPARSIFY_CPU_KERNELS=0"),
                                        PT_VERDICT, REF_VERDICT]
    _compare_models(m, ref, fast_out, ref_out)


def test_sparse_lstm_cell_on_tvm_cpu_matches_reference(monkeypatch):
    need_cpu_kernels()
    torch.manual_seed(0)
    cell = SparseLSTMCell(24, 20, structured_dropout=StructuredDropout(0.5, 0.5)).train()
    ref = copy.deepcopy(cell)
    x = torch.randn(3, 24)
    hx = (torch.randn(3, 20), torch.randn(3, 20))

    def step(mod):
        torch.manual_seed(7)
        h, c = mod(x, hx)
        (h.sum() + 2 * c.sum()).backward()
        return h.detach(), c.detach()

    a = step(cell)
    assert cell.last_backend == "tvm_cpu"
    monkeypatch.setenv("RNN_SPARSIFY_CPU_KERNELS", "0")
    b = step(ref)
    assert ref.last_backend == "reference"
    for u, v in zip(a, b):
        assert rel_err(u, v) <= RTOL
    for (n, p), (_, q) in zip(cell.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, q.grad) <= RTOL, n


@pytest.mark.parametrize("case", ["packed", "proj", "float64"])
def test_sparse_lstm_falls_back_with_reason(case):
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 24, 20
    sd = StructuredDropout(0.5, 0.5)
    if case == "packed":
        m = SparseLSTM(I, H, structured_dropout=sd)
        x = pack_padded_sequence(torch.randn(T, B, I), [5, 4, 2])
        why = "PackedSequence input (per-step batch sizes; no kernels for them)"
    elif case == "proj":
        m = SparseLSTM(I, H, proj_size=8, structured_dropout=sd)
        x = torch.randn(T, B, I)
        why = "proj_size > 0 (no projection kernels)"
    else:
        m = SparseLSTM(I, H, structured_dropout=sd, dtype=torch.float64)
        x = torch.randn(T, B, I, dtype=torch.float64)
        why = "dtype torch.float64 (the CPU kernels are float32)"
    m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a plain CPU fallback does not warn
        out, (h, c) = m(x)
    o = out.data if case == "packed" else out
    (o.sum() + h.sum()).backward()
    assert m.last_backend == "reference"
    assert m.last_backend_reasons == [("tvm_cpu", why), PT_VERDICT, REF_VERDICT]
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_eval_is_dense_path():
    m = SparseLSTM(24, 20, structured_dropout=StructuredDropout(0.5, 0.5)).eval()
    m(torch.randn(5, 3, 24))
    assert m.last_path == "dense"


def _non_contiguous_weight_step(dtype, monkeypatch, kernels=True):
    torch.manual_seed(0)
    m = SparseLSTM(24, 20, structured_dropout=StructuredDropout(0.5, 0.5), dtype=dtype).train()
    ref = copy.deepcopy(m)  # contiguous weights, same values
    # a parameter with transposed strides (nn.LSTM accepts it)
    m.weight_ih_l0 = torch.nn.Parameter(m.weight_ih_l0.detach().t().contiguous().t())
    assert not m.weight_ih_l0.is_contiguous()
    x = torch.randn(5, 3, 24, dtype=dtype)
    if not kernels:
        monkeypatch.setenv("RNN_SPARSIFY_CPU_KERNELS", "0")
    a = _train_step(m, x, seed=5)
    monkeypatch.setenv("RNN_SPARSIFY_CPU_KERNELS", "0")
    b = _train_step(ref, x, seed=5)
    _compare_models(m, ref, a, b)
    return m


def test_tvm_cpu_non_contiguous_weight(monkeypatch):
    need_cpu_kernels()
    m = _non_contiguous_weight_step(torch.float32, monkeypatch)
    assert m.last_backend == "tvm_cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_path_non_contiguous_weight(dtype, monkeypatch):
    m = _non_contiguous_weight_step(dtype, monkeypatch, kernels=False)
    assert m.last_backend == "reference"


def test_unbatched_input_on_tvm_cpu(monkeypatch):
    need_cpu_kernels()
    torch.manual_seed(0)
    m = SparseLSTM(24, 20, structured_dropout=StructuredDropout(0.5, 0.5)).train()
    ref = copy.deepcopy(m)
    x = torch.randn(5, 24)  # (T, I): batch of one, dropped on output
    a = _train_step(m, x, seed=9)
    assert m.last_backend == "tvm_cpu" and a[0].shape == (5, 20) and a[1].shape == (1, 20)
    monkeypatch.setenv("RNN_SPARSIFY_CPU_KERNELS", "0")
    b = _train_step(ref, x, seed=9)
    _compare_models(m, ref, a, b)


def test_dry_selection_builds_and_loads_nothing(tmp_path, monkeypatch):
    """Reports (explain_lstm / select_layer_backend(dry=True)) never build or load kernels."""
    pytest.importorskip("tvm_ffi")
    from rnn_sparsify.kernels import cpu_backend, cpu_runtime
    from rnn_sparsify.kernels.layer import explain_lstm

    monkeypatch.setenv("RNN_SPARSIFY_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("RNN_SPARSIFY_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu_runtime, "_LOADED", {})
    monkeypatch.setattr(cpu_runtime, "_BUNDLES", [])
    monkeypatch.setattr(cpu_runtime, "_ENV_CHECKED", True)
    monkeypatch.setattr(cpu_backend, "_FAILED", {})

    def forbidden(*a, **k):
        raise AssertionError("a dry selection must not build or load")

    monkeypatch.setattr(cpu_runtime, "build_entry", forbidden)
    monkeypatch.setattr(cpu_runtime, "load_layer", forbidden)
    m = SparseLSTM(24, 20, structured_dropout=StructuredDropout(0.5, 0.5))
    name, verdicts = explain_lstm(m, batch=3, seq_len=5)
    if cpu_runtime.tvm_available():
        assert name == "tvm_cpu"
        assert verdicts == [("tvm_cpu", f"used: {cpu_runtime.host_isa()} kernels, compiled on "
                                        "first use (a few seconds) and cached")]
    name, verdicts = explain_lstm(SparseLSTM(24, 20, structured_dropout=StructuredDropout(0.5, 0.5),
                                             dtype=torch.float64))
    assert name == "reference"
    assert verdicts == [("tvm_cpu", "dtype torch.float64 (the CPU kernels are float32)"), PT_VERDICT, REF_VERDICT]
    name, verdicts = explain_lstm(SparseLSTM(24, 20))
    assert name == "nn.LSTM" and verdicts[0][0] == "dense"
    # the configs a report is about to apply, for a plain nn.LSTM (the module is not touched)
    plain = torch.nn.LSTM(24, 20)
    name, verdicts = explain_lstm(plain, batch=3, configs=(StructuredDropout(0.5, 0.5), None))
    assert name == ("tvm_cpu" if cpu_runtime.tvm_available() else "reference")
    assert verdicts[0][0] == "tvm_cpu" and not hasattr(plain, "structured_dropout")
    name, verdicts = explain_lstm(plain, configs=(None, None))
    assert name == "nn.LSTM"
    assert not (tmp_path / "empty").exists()
