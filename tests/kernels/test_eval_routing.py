"""Measured routing of rule 1 of the eval rule list (``persistent_eval``, issue 9: "speed is the
product"): in ``auto`` mode the first call per key times the persistent kernels against
``nn.LSTM.forward`` and the faster runs from then on. Without a GPU: CUDA is stood in for (the
device checks pass), the persistent path returns a marker output, the timer is a fake."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rnn_sparsify.kernels import eval_rules as er
from rnn_sparsify.kernels import persistent_eval as pe

from .test_persistent_eval import _pruned

PERSISTENT_VALUE = 7.0  # the fake persistent path's output (nn.LSTM never gives 7: |h| < 1)


class FakeTimer:
    """Returns fixed times per path; calls each path once (as the real timer's warm-up does)."""

    def __init__(self, persistent_ms, dense_ms):
        self.times = {pe.BACKEND: persistent_ms, pe.DENSE: dense_ms}
        self.calls = []

    def __call__(self, paths, device):
        self.calls.append(sorted(paths))
        for fn in paths.values():
            fn()
        return dict(self.times)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA stood in for: the static checks pass, the bundle 'has' a kernel for every call (entry
    key per batch), the persistent path returns a marker output and counts its runs."""
    state = SimpleNamespace(runs=0, kernel_loads=0)

    def kernels_for(dev):
        state.kernel_loads += 1
        return SimpleNamespace(arch="sm_90")

    def run(mod, x, hx, kernels, plan):
        state.runs += 1
        T, B, _ = x.shape
        h = torch.full((T, B, mod.hidden_size), PERSISTENT_VALUE)
        return h, (h[-1:].clone(), h[-1:].clone())

    monkeypatch.setattr(er, "_on_cuda", lambda inp: True)
    monkeypatch.setattr(pe, "why_not_static", lambda *a: None)
    monkeypatch.setattr(pe, "_kernels_for", kernels_for)
    monkeypatch.setattr(pe, "_plan", lambda mod, k, B, dt: {(0, 0): (SimpleNamespace(key=f"entry-b{B}"),)})
    monkeypatch.setattr(pe, "_run", run)
    monkeypatch.setattr(pe, "_WARNED", set())
    monkeypatch.delenv(pe.MODE_ENV_VAR, raising=False)
    pe.set_eval_mode(None)
    pe.clear_routing()
    yield state
    pe.set_timer(None)
    pe.set_eval_mode(None)
    pe.clear_routing()


def _dense(m, x):
    ref = nn.LSTM(m.input_size, m.hidden_size, m.num_layers).double()
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items() if not k.endswith("_mask")})
    with torch.no_grad():
        return ref(x.double())[0]


def _eval(m, x):
    with torch.no_grad():
        return m(x)[0]


@pytest.mark.parametrize("p_ms,d_ms,winner", [(1.0, 2.0, "persistent"), (3.0, 2.0, "dense"), (2.0, 2.0, "dense")])
def test_the_faster_path_runs_and_the_verdict_is_cached(fake_cuda, p_ms, d_ms, winner):
    timer = FakeTimer(p_ms, d_ms)
    pe.set_timer(timer)
    m = _pruned(5, 8)
    x = torch.randn(3, 2, 5)
    runs = "the persistent kernels run" if winner == "persistent" else "nn.LSTM runs"
    text = f"measured {p_ms:.3g} ms vs nn.LSTM {d_ms:.3g} ms on this GPU at this shape; {runs}"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for call in range(3):
            y = _eval(m, x)
            assert len(timer.calls) == 1, "measured again for the same key"
            assert m.last_eval_routing == text
            if winner == "persistent":
                assert m.last_path == "persistent_eval" and bool((y == PERSISTENT_VALUE).all())
                assert m.last_eval_reasons == [(er.PERSISTENT, f"used: {text}")]
                assert m.last_eval_reason == f"sparse persistent kernels ({text})"
                # the first call reuses the measured run's output: one persistent run per call
                assert fake_cuda.runs == call + 1
            else:
                assert m.last_path == "dense" and not bool((y == PERSISTENT_VALUE).any())
                torch.testing.assert_close(y.double(), _dense(m, x), rtol=0, atol=1e-5)
                assert m.last_eval_reasons[0] == (er.PERSISTENT, text)
                assert m.last_eval_reasons[-1] == ("nn.LSTM", "used")
                assert m.last_eval_reason.startswith(f"{er.PERSISTENT}: {text}")
                assert fake_cuda.runs == 1  # only inside the measurement
    slower = [x for x in w if "slower than nn.LSTM" in str(x.message)]
    if winner == "persistent":
        assert not slower
    else:  # once per key, naming the override
        assert len(slower) == 1 and f"{pe.MODE_ENV_VAR}=always" in str(slower[0].message)
    assert timer.calls == [sorted([pe.BACKEND, pe.DENSE])]
    (verdict,) = pe.routing_verdicts().values()
    assert (verdict.persistent_ms, verdict.dense_ms) == (p_ms, d_ms)


def test_a_new_key_measures_again(fake_cuda):
    timer = FakeTimer(1.0, 2.0)
    pe.set_timer(timer)
    m = _pruned(5, 8)
    _eval(m, torch.randn(3, 2, 5))
    _eval(m, torch.randn(3, 4, 5))  # another batch (and bundle entry)
    _eval(m, torch.randn(6, 2, 5))  # another sequence length
    _eval(_pruned(5, 12), torch.randn(3, 2, 5))  # another hidden size
    assert len(timer.calls) == 4
    _eval(m, torch.randn(3, 2, 5))
    _eval(m, torch.randn(6, 2, 5))
    assert len(timer.calls) == 4 and len(pe.routing_verdicts()) == 4
    keys = sorted(pe.routing_verdicts())
    assert {k[-4:-1] for k in keys} == {(2, 3, "float32"), (4, 3, "float32"), (2, 6, "float32")}  # batch, T, dtype
    pe.clear_routing()
    _eval(m, torch.randn(3, 2, 5))
    assert len(timer.calls) == 5


def test_packed_input_is_routed_by_its_runs(fake_cuda, monkeypatch):
    """A PackedSequence: the key holds T, the largest batch and the number of runs of equal
    batch (the persistent path's launches per layer and direction), not every length."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    def run_packed(mod, packed, hx, kernels, plan):
        fake_cuda.runs += 1
        data = torch.full((packed.data.shape[0], mod.hidden_size), PERSISTENT_VALUE)
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), None

    monkeypatch.setattr(pe, "_run_packed", run_packed)
    timer = FakeTimer(1.0, 2.0)
    pe.set_timer(timer)
    m = _pruned(5, 8)
    x = torch.randn(6, 4, 5)

    def packed(lengths):
        with torch.no_grad():
            return m(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False))[0]

    out = packed([6, 3, 3, 1])  # runs of batch 4, 3, 1: 3 launches
    assert isinstance(out, PackedSequence) and bool((out.data == PERSISTENT_VALUE).all())
    assert m.last_path == "persistent_eval" and len(timer.calls) == 1
    packed([6, 4, 4, 2])  # other lengths, again 3 runs, T 6, batch 4: the same verdict
    assert len(timer.calls) == 1
    packed([6, 5, 3, 1])  # 4 runs: measured again
    assert len(timer.calls) == 2
    assert {k[-6:-3] for k in pe.routing_verdicts()} == {("packed", 3, 4), ("packed", 4, 4)}
    _eval(m, x)  # the padded input of the same T and batch is a key of its own
    assert len(timer.calls) == 3


def test_always_and_never_do_not_measure(fake_cuda, monkeypatch):
    timer = FakeTimer(3.0, 2.0)  # the kernels would lose: `always` runs them anyway
    pe.set_timer(timer)
    m = _pruned(5, 8)
    x = torch.randn(3, 2, 5)
    monkeypatch.setenv(pe.MODE_ENV_VAR, "always")
    y = _eval(m, x)
    assert bool((y == PERSISTENT_VALUE).all()) and m.last_path == "persistent_eval"
    assert m.last_eval_reasons == [(er.PERSISTENT, "used")] and m.last_eval_routing is None
    monkeypatch.setenv(pe.MODE_ENV_VAR, "never")
    loads = fake_cuda.kernel_loads
    y = _eval(m, x)
    assert m.last_path == "dense" and fake_cuda.kernel_loads == loads  # the bundle is not even loaded
    torch.testing.assert_close(y.double(), _dense(m, x), rtol=0, atol=1e-5)
    assert f"{pe.MODE_ENV_VAR}=never" in dict(m.last_eval_reasons)[er.PERSISTENT]
    pe.set_eval_mode("always")  # the process-wide setting wins over the environment
    assert pe.eval_mode() == "always" and bool((_eval(m, x) == PERSISTENT_VALUE).all())
    assert timer.calls == [] and pe.routing_verdicts() == {}


def test_an_unknown_mode_is_a_clear_error(fake_cuda, monkeypatch):
    m = _pruned(5, 8)
    monkeypatch.setenv(pe.MODE_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"RNN_SPARSIFY_PERSISTENT_EVAL='fast': expected one of auto, always, never"):
        _eval(m, torch.randn(3, 2, 5))
    assert "raises an error" in er.explain_cuda(m) and "'fast'" in er.explain_cuda(m)
    with pytest.raises(ValueError, match="set_eval_mode='sometimes'"):
        pe.set_eval_mode("sometimes")
    monkeypatch.setenv(pe.MODE_ENV_VAR, "")
    assert pe.eval_mode() == "auto"  # empty: the default


def test_time_paths_warms_up_then_interleaves_and_takes_medians():
    log = []
    durations = iter([5.0, 1.0, 4.0, 2.0, 3.0, 9.0])  # a, b, a, b, a, b

    def stopwatch(device):
        log.append("start")
        return lambda: log.append("stop") or next(durations)

    paths = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    ms = pe.time_paths(paths, torch.device("cpu"), repeats=3, stopwatch=stopwatch)
    assert ms == {"a": 4.0, "b": 2.0}
    assert log == ["a", "b"] + ["start", "a", "stop", "start", "b", "stop"] * 3


def test_explain_says_the_rule_is_measured(monkeypatch):
    monkeypatch.setattr(pe, "_config", {"path": None, "mode": None})
    monkeypatch.delenv(pe.MODE_ENV_VAR, raising=False)
    m = _pruned(12, 16, sparsity=0.9)
    text = er.explain_cuda(m)
    assert "measured" in text and f"{pe.MODE_ENV_VAR}=auto" in text and "faster runs" in text
    monkeypatch.setenv(pe.MODE_ENV_VAR, "always")
    assert "unmeasured" in er.explain_cuda(m)
    monkeypatch.setenv(pe.MODE_ENV_VAR, "never")
    assert er.explain_cuda(m) == f"eval() on CUDA runs nn.LSTM (cuDNN) ({pe.MODE_ENV_VAR}=never)"
    from rnn_sparsify.cli import env_report

    (line,) = [ln for ln in env_report().splitlines() if ln.startswith(pe.MODE_ENV_VAR)]
    assert line.startswith(f"{pe.MODE_ENV_VAR}: never (auto|always|never;")


@pytest.mark.filterwarnings("ignore:.*slower than nn.LSTM:RuntimeWarning")
def test_the_eval_benchmark_times_the_kernels_and_reports_the_verdict(fake_cuda):
    """benchmarks/gpu_sparse_eval.py (its GPU code on the stood-in CUDA, wall clock): the
    kernels variant runs them whatever the routing says, the auto variant follows the verdict,
    and the report prints it."""
    import importlib.util
    from argparse import Namespace
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_sparse_eval.py"
    spec = importlib.util.spec_from_file_location("gpu_sparse_eval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pe.set_timer(FakeTimer(3.0, 2.0))
    a = Namespace(hidden=8, density=0.3, batch=2, seq=3, layers=1, dtype="float32", repeats=2)
    res = bench.measure(a, torch.device("cpu"), torch.float32, bench.wall_stopwatch)
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows[bench.KERNELS]["path"] == "persistent_eval" and rows[bench.AUTO]["path"] == "dense"
    text = "measured 3 ms vs nn.LSTM 2 ms on this GPU at this shape; nn.LSTM runs"
    assert res["routing"] == text and [v["winner"] for v in res["routing_verdicts"]] == ["nn.LSTM"]
    assert f"routing verdict (auto, first call): {text}" in bench.report(a, res, "fake")
    assert pe.eval_mode() == "auto"  # the benchmark put the process-wide mode back
