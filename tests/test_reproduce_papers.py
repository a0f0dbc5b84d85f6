"""benchmarks/reproduce_papers.py: the results page built from fake run JSON (tables, verdicts,
missing runs, plots), resuming (existing JSON is not rerun), and one --quick run end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduce_papers.py"


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("reproduce_papers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# fake validation perplexity per variant (seed 1; seed 2 is +2)
FAKE = {"dense": 150.0, "sd_nr": 151.0, "sd_nr_rh": 160.0, "gg_coarse": 170.0, "gg_coarse_das": 152.0,
        "gg_fine": 171.0, "gg_fine_das": 149.0, "gg_meprop": 180.0, "gg_meprop_das": 156.0,
        "np_gradual80": 155.0, "np_gradual90": 165.0, "st_dst_uniform": 140.0, "st_static": 145.0,
        "st_e128_dense": 152.0, "st_e128_dst_uniform": 144.0, "st_e128_dst_er": 146.0}


def _write_fake(out_dir: Path, rp, skip=()):
    out_dir.mkdir(parents=True, exist_ok=True)
    for v, ppl in FAKE.items():
        if v in skip:
            continue
        for seed in (1, 2):
            run = {"variant": "dense" if v == "dense" else "sparse", "val_ppl": ppl + 2 * (seed - 1),
                   "test_ppl": ppl - 5 + 2 * (seed - 1), "ms_per_step": 100.0, "steps": 4, "train_loss": [6.0, 5.5, 5.2, 5.0],
                   "val_curve": [[2, 400.0], [4, ppl + 20]]}
            if v.startswith(("np_", "st_")):
                run["lstm_weight_sparsity"] = {"np_gradual80": 0.8, "np_gradual90": 0.9}.get(v, 0.67)
            data = {"runs": [run], "config": {"hidden": 256, "emb": 256, "vocab": 5000, "batch": 20, "seq": 35,
                                              "steps": 4, "optimizer": "adam", "lr": 0.002, "threads": 1,
                                              "torch": "x", "data": str(ROOT / "examples" / "data" / "shakespeare")},
                    "reproduce": {"variant": v, "seed": seed, "label": rp.VARIANTS[v][0], "wall_s": 60.0,
                                  "command": "python examples/train_lm.py", "machine": "test"}}
            (out_dir / f"{v}_s{seed}.json").write_text(json.dumps(data))


def test_tables_and_verdicts_from_fake_json(rp, tmp_path):
    _write_fake(tmp_path, rp)
    md = tmp_path / "results.md"
    text = rp.build_markdown(rp.load_results(tmp_path), tmp_path, md)
    assert md.read_text() == text and "32 of 32 runs" in text
    assert "| dense nn.LSTM, standard dropout 0.3 | 150.0 / 152.0 | 151.0 | 145.0 / 147.0 | 146.0 | 100 | 100% |" in text
    assert "| gradual pruning to 90 % | 165.0 / 167.0 | 166.0 |" in text and "| 10.0% |" in text
    v = rp.verdicts(rp.load_results(tmp_path))
    assert "structured NR 152.0 (+0.7 %): holds" in v["structured_dropout"]
    assert "structured NR+RH 161.0 (+6.6 %): does not hold" in v["structured_dropout"]
    assert "dense's two seeds differ by 2.0" in v["structured_dropout"]
    assert "coarse: 171.0 sparse to the end, 153.0 with dense-after-sparse (+1.3 % vs dense): holds" in v["gate_gradient"]
    assert "meprop: 181.0 sparse to the end, 157.0 with dense-after-sparse (+4.0 % vs dense): does not hold" in v["gate_gradient"]
    assert "80 % sparse 156.0 (+3.3 %): holds" in v["gradual_pruning"]
    assert "90 % sparse 166.0 (+9.9 %): does not hold" in v["gradual_pruning"]
    assert "DST 67 % uniform 141.0 vs static 146.0 mean validation perplexity (better on 2 of 2 seeds): holds" in v["dst"]
    assert "matches or beats dense" in v["dst"]
    assert "ER 147.0, uniform 145.0, dense 153.0 (+1.4 % ER vs uniform)" in v["dst"]
    for key, title, _ in rp.PAPERS:
        assert f"## {title}" in text and f"**Verdict.** {v[key]}" in text
        if importlib.util.find_spec("matplotlib"):
            assert (tmp_path / f"{key}.png").is_file() and f"]({key}.png)" in text
    assert "--weight-method static" in text and "--seed 1 --threads 1" in text  # the commands


def test_missing_runs_are_reported_not_judged(rp, tmp_path):
    _write_fake(tmp_path, rp, skip={"st_static", "gg_fine"})
    text = rp.build_markdown(rp.load_results(tmp_path), tmp_path, tmp_path / "r.md")
    assert "28 of 32 runs" in text
    assert "| static sparse 67 %, uniform random | not run yet |" in text
    v = rp.verdicts(rp.load_results(tmp_path))
    assert v["dst"].startswith("Not measured") and v["gate_gradient"].startswith("Not measured")
    assert "holds" in v["structured_dropout"]


def test_quick_run_resumes_and_builds_the_page(tmp_path):
    out = tmp_path / "papers"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--only", "dense,st_static", "--seeds", "1",
           "--out-dir", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads((out / "st_static_s1.json").read_text())
    assert data["reproduce"]["variant"] == "st_static" and abs(data["runs"][0]["lstm_weight_sparsity"] - 0.67) < 0.01
    assert "--weight-method static" in data["reproduce"]["command"]
    page = (out / "results.md").read_text()
    assert "Smoke run" in page and "2 of 32 runs" in page
    mtime = (out / "dense_s1.json").stat().st_mtime_ns
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and "done already" in r.stdout
    assert (out / "dense_s1.json").stat().st_mtime_ns == mtime
    r = subprocess.run([*cmd[:2], "--only", "nope"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown variant" in r.stderr


def test_a_narrow_miss_is_called_narrow(rp):
    res = {"v": {1: {"val_ppl": 100.0}, 2: {"val_ppl": 104.0}}}  # mean 102, seeds 4 apart
    assert rp._judge(res, "v", 102.0) == "holds"
    assert rp._judge(res, "v", 101.0).startswith("does not hold, narrowly (1.0 over")
    assert rp._judge(res, "v", 97.0) == "does not hold"
