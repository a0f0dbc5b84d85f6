"""The benchmark scripts run end to end at toy sizes (they measure nothing here; they must
not rot between the sessions that measure with them)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_cpu_sparse_eval_benchmark_runs(tmp_path):
    pytest.importorskip("tvm")
    d = _run("cpu_sparse_eval.py", "--hidden", "24", "--batch", "3", "--sparsity", "0.95", "--threads", "1",
             "--repeats", "1", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in d["rows"]}
    assert set(rows) == {"nn.LSTM", "SparseLSTM (auto)", "sparse kernels (forced)", "torch.sparse_csr loop"}
    assert rows["sparse kernels (forced)"]["path"] == "sparse_eval"
    assert rows["nn.LSTM"]["speedup"] == 1.0 and d["machine"]


def test_cpu_train_step_benchmark_runs(tmp_path):
    pytest.importorskip("tvm")
    d = _run("cpu_train_step.py", "--hidden", "24", "--batch", "3", "--seq", "4", "--threads", "1",
             "--repeats", "1", "--only", "SD(", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in d["rows"]}
    assert rows["SD(0.5, 0.5)"]["backend"] == "tvm_cpu"
    assert rows["nn.LSTM (dropout 0.5)"]["speedup"] == 1.0


def test_gpu_sparse_eval_benchmark_skips_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check.sh runs this benchmark for real")
    d = _run("gpu_sparse_eval.py", "--hidden", "24", "--batch", "2", "--seq", "3", tmp_path=tmp_path)
    assert d["skipped"].startswith("skipped: needs a CUDA GPU") and d["config"]["hidden"] == 24


def test_gpu_sparse_eval_selfcheck_runs_its_code_on_the_cpu(tmp_path):
    d = _run("gpu_sparse_eval.py", "--selfcheck", tmp_path=tmp_path)
    assert d["selfcheck"] and [r["variant"] for r in d["rows"]] == ["nn.LSTM", "persistent kernels",
                                                                   "SparseLSTM (auto)"]
    assert d["routing"] is None and "not on CUDA" in d["auto_reason"]  # CPU: rule 1 does not apply


def _gpu_train_step():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_train_step", ROOT / "benchmarks" / "gpu_train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_train_step_benchmark_skips_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check.sh runs this benchmark for real")
    d = _run("gpu_train_step.py", "--bundle", str(tmp_path), "--only", "backward", tmp_path=tmp_path)
    assert d["skipped"].startswith("skipped: needs a CUDA GPU") and d["config"]["only"] == "backward"
    assert d["config"]["step_hidden"] == 1500 and d["config"]["bwd_hidden"] == 512  # the shapes


def test_gpu_train_step_selfcheck_runs_both_targets_through_the_timing_code(tmp_path, capsys):
    """The GPU run's code path on the CPU (tiny sizes, float64, wall clock instead of CUDA
    events): models, variants, interleaved timing, what ran per row, Markdown and JSON."""
    from rnn_sparsify.kernels import layer

    bench = _gpu_train_step()
    rules = [n for n, _ in layer._LAYER_RULES]
    assert bench.main(["--selfcheck", "--json", str(tmp_path / "out.json")]) == 0
    assert [n for n, _ in layer._LAYER_RULES] == rules  # the per-step variant put the rule back
    d = json.loads((tmp_path / "out.json").read_text())
    assert [r["target"] for r in d["results"]] == ["step", "backward"]
    for r in d["results"]:
        rows = {row["variant"]: row for row in r["rows"]}
        assert list(rows) == [bench.BASE, bench.AUTO, bench.PER_STEP]
        assert rows[bench.BASE]["speedup"] == 1.0 and rows[bench.BASE]["layers"] == ["cuDNN"]
        n_layers = 2 if r["target"] == "step" else 1
        for v in (bench.AUTO, bench.PER_STEP):
            row = rows[v]
            assert row["path"] == "sparse" and row["layers"] == ["reference"] * n_layers, row
            assert row["median_ms"] > 0 and len(row["runs_ms"]) == 1
        rules_auto = [n for n, _ in rows[bench.AUTO]["reasons"]]
        rules_step = [n for n, _ in rows[bench.PER_STEP]["reasons"]]
        assert "persistent_train" in rules_auto and "persistent_train" not in rules_step
    out = capsys.readouterr().out
    assert "| SparseLSTM, per-step GEMMs |" in out and "goal: >= 1.8x" in out and "goal: >= 1.5x" in out


def test_gpu_train_step_bundle_holds_what_its_models_ask_for():
    """``bundle_requests`` (built by ``gpu_check.sh prepare``) against the models the benchmark
    builds: the same GEMM problems as ``LSTMSpec.from_module``, and persistent training entries
    that the ``persistent_train`` rule matches for every layer call (captured on the CPU)."""
    from types import SimpleNamespace

    import torch

    from rnn_sparsify import lstm_function
    from rnn_sparsify.codegen.lstm_spec import LSTMSpec
    from rnn_sparsify.kernels.persistent_train import match_entries

    bench = _gpu_train_step()
    a = bench.parser().parse_args(["--bundle", "b", "--json", "o.json"])  # the run stage's arguments
    specs, train = bench.bundle_requests(a.step_hidden, a.step_layers, a.step_batch, a.p, a.bwd_hidden,
                                         a.bwd_batch, a.seq, a.dtype)
    entries = [SimpleNamespace(spec=s.to_dict()) for req in train for s in req.specs("sm_90")]
    problems = []
    orig = lstm_function.select_layer_backend

    def rec(problem, **kw):
        problems.append(problem)
        return orig(problem, **kw)

    cpu, dt = torch.device("cpu"), getattr(torch, a.dtype)
    models = [(bench.build_step_models(a.step_hidden, a.step_layers, a.p, cpu, dt)[1], a.step_batch),
              (bench.build_backward_models(a.bwd_hidden, cpu, dt)[1], a.bwd_batch)]
    lstm_function.select_layer_backend = rec
    try:
        for (m, B), spec in zip(models, specs):
            got = LSTMSpec.from_module(m, B, a.seq, a.dtype)
            assert {s.problem for _, s in got.gemms()} == {s.problem for _, s in spec.gemms()}
            with torch.no_grad():
                m(torch.randn(2, B, m.input_size, dtype=dt))  # two steps: the layer problems
    finally:
        lstm_function.select_layer_backend = orig
    assert len(problems) == a.step_layers + 1
    for p in problems:
        fwd_bwd = match_entries(entries, p)
        assert not isinstance(fwd_bwd, str), fwd_bwd
        assert fwd_bwd[0].spec["hidden_size"] == p.hidden_size


def test_gpu_train_step_a_failing_variant_is_reported_and_the_others_still_run(monkeypatch):
    """A variant that raises (e.g. a kernel the driver refuses) becomes an error row; the
    baseline and the other variants are still timed, and main's exit code is 1."""
    import torch

    bench = _gpu_train_step()
    orig = bench.make_variants

    def broken(*args):
        v = orig(*args)
        setup, _ = v[bench.AUTO]
        v[bench.AUTO] = (setup, lambda: (_ for _ in ()).throw(RuntimeError("launch refused")))
        return v

    monkeypatch.setattr(bench, "make_variants", broken)
    base, sparse = bench.build_backward_models(8, torch.device("cpu"), torch.float64)
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    rows = bench.run_target("backward", base, sparse, x, torch.randn(3, 4, 8, dtype=torch.float64), repeats=2,
                            warmup=1, timer=bench.wall_timer, device=torch.device("cpu"))
    assert [r["variant"] for r in rows] == [bench.BASE, bench.PER_STEP, bench.AUTO]
    assert rows[-1]["error"] == "RuntimeError: launch refused" and len(rows[1]["runs_ms"]) == 2
    res = [{"target": "backward", "shape": "s", "goal": 1.5, "rows": rows}]
    assert bench.errors(res) == ["backward: SparseLSTM: RuntimeError: launch refused"]
    assert "| SparseLSTM | failed: RuntimeError: launch refused |" in bench.markdown(res, "h")
    assert bench.main(["--selfcheck", "--only", "backward"]) == 1


@pytest.mark.parametrize("args,msg", [(["--p", "1.5"], "--p must be in (0, 1)"),
                                      (["--repeats", "0"], "--repeats must be >= 1"),
                                      (["--warmup", "0"], "--warmup must be >= 1"),
                                      (["--bwd-hidden", "-2"], "--bwd-hidden must be >= 1")])
def test_gpu_train_step_bad_arguments_are_clear_errors(args, msg):
    with pytest.raises(SystemExit, match=msg.replace("(", r"\(").replace(")", r"\)")):
        _gpu_train_step().main(args)
