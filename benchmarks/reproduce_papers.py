"""Reproduce the quality claim of each paper behind rnn_sparsify on the shipped corpus.

Runs ``examples/train_lm.py`` once per (variant, seed), one process at a time, every run the same
model, data, optimizer, number of steps and seed-derived initial weights and batches, then builds
``docs/results.md`` (a table per paper, learning-curve plots, a verdict sentence per claim).

    python benchmarks/reproduce_papers.py --threads 1          # everything (about an hour on one core)
    python benchmarks/reproduce_papers.py --quick               # smoke run: tiny model, a few steps, runs/papers-quick/
    python benchmarks/reproduce_papers.py --tables-only         # rebuild docs/results.md from the JSON there
    python benchmarks/reproduce_papers.py --only dense,st_dst_uniform --seeds 1

A run whose JSON already exists in ``--out-dir`` is skipped (resume after an interruption;
delete a file to rerun it). Papers and claims:

* structured dropout (Sarma et al. 2021): structured NR / NR+RH dropout, perplexity no worse
  than standard (random) dropout;
* gate-gradient sparsity (Zhu et al. 2018; meProp, Sun et al. 2017): with dense-after-sparse,
  sparse gate gradients recover the dense model's accuracy;
* gradual pruning (Narang et al. 2017): 80-90 % sparse LSTMs come near the dense model;
* dynamic sparse training (ST-RNN, Liu et al. 2021): DST beats a static sparse network with the
  same number of non-zeros (and can match dense); uniform vs Erdos-Renyi topology on a model
  with a 128-d embedding (with emb = hidden the two are the same masks).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_lm.py"
OUT_DIR = ROOT / "docs" / "results" / "papers"
RESULTS_MD = ROOT / "docs" / "results.md"
QUICK_DIR = Path("runs") / "papers-quick"

# The scale: 2x256 LSTM (tied embedding/decoder), 5k vocabulary, batch 20 x 35 steps, Adam,
# 1000 steps (0.83 epoch of the shipped corpus); about 100-120 s per run on one core.
SCALE = ["--emb", "256", "--hidden", "256", "--vocab", "5000", "--batch", "20", "--seq", "35", "--steps", "1000",
         "--optimizer", "adam", "--lr", "2e-3", "--clip", "0.25", "--dropout-in", "0.3", "--curve-points", "10"]
QUICK = ["--emb", "16", "--hidden", "16", "--vocab", "500", "--batch", "4", "--seq", "8", "--steps", "8",
         "--optimizer", "adam", "--eval-batches", "2", "--curve-points", "2", "--weight-freq", "1",
         "--update-every", "2"]

_STD = ["--no-compare", "--sparse-dropout", "standard"]  # the sparse model keeps the standard dropout
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense nn.LSTM, standard dropout 0.3", ["--dense-only"]),
    # structured dropout
    "sd_nr": ("structured NR 0.3", ["--no-compare", "--gate", "none", "--dropout-rec", "0"]),
    "sd_nr_rh": ("structured NR 0.3 + RH 0.3", ["--no-compare", "--gate", "none", "--dropout-rec", "0.3"]),
    # gate-gradient sparsity, with and without dense-after-sparse (last 25 % of the steps dense)
    **{f"gg_{g}{suffix}": (f"{g}{' + dense-after-sparse' if das else ''}",
                           [*_STD, "--gate", g, "--dense-after", "0.25" if das else "0"])
       for g in ("coarse", "fine", "meprop") for suffix, das in (("", False), ("_das", True))},
    # gradual pruning
    "np_gradual80": ("gradual pruning to 80 %", [*_STD, "--gate", "none", "--weight-method", "gradual",
                                                 "--weight-sparsity", "0.8"]),
    "np_gradual90": ("gradual pruning to 90 %", [*_STD, "--gate", "none", "--weight-method", "gradual",
                                                 "--weight-sparsity", "0.9"]),
    # dynamic sparse training vs static sparse at 67 %
    "st_dst_uniform": ("DST 67 %, uniform", [*_STD, "--gate", "none", "--weight-method", "dst",
                                             "--weight-sparsity", "0.67", "--weight-init", "uniform"]),
    "st_static": ("static sparse 67 %, uniform random", [*_STD, "--gate", "none", "--weight-method", "static",
                                                         "--weight-sparsity", "0.67", "--weight-init", "uniform"]),
    # Erdos-Renyi needs matrices of different shapes: with emb = hidden every LSTM matrix is
    # 4H x H and ER gives them all the uniform density (the same masks). A 128-d embedding
    # (untied decoder) makes layer 0's input matrix 4H x 128, which ER keeps 1.5x denser.
    "st_e128_dense": ("dense, 128-d embedding", ["--emb", "128", "--dense-only"]),
    "st_e128_dst_uniform": ("DST 67 %, uniform, 128-d embedding",
                            ["--emb", "128", *_STD, "--gate", "none", "--weight-method", "dst",
                             "--weight-sparsity", "0.67", "--weight-init", "uniform"]),
    "st_e128_dst_er": ("DST 67 %, Erdos-Renyi, 128-d embedding",
                       ["--emb", "128", *_STD, "--gate", "none", "--weight-method", "dst",
                        "--weight-sparsity", "0.67", "--weight-init", "erdos_renyi"]),
}

# (key, title, variants in table order); "dense" is the shared baseline of every paper
PAPERS = [
    ("structured_dropout", "Structured dropout (Sarma et al. 2021)", ["dense", "sd_nr", "sd_nr_rh"]),
    ("gate_gradient", "Gate-gradient sparsity and dense-after-sparse (Zhu et al. 2018; meProp, Sun et al. 2017)",
     ["dense", "gg_coarse", "gg_coarse_das", "gg_fine", "gg_fine_das", "gg_meprop", "gg_meprop_das"]),
    ("gradual_pruning", "Gradual magnitude pruning (Narang et al. 2017)", ["dense", "np_gradual80", "np_gradual90"]),
    ("dst", "Dynamic sparse training (ST-RNN, Liu et al. 2021)",
     ["dense", "st_dst_uniform", "st_static", "st_e128_dense", "st_e128_dst_uniform", "st_e128_dst_er"]),
]

# "no worse" / "near": the tolerances the verdicts use (relative to the dense mean validation ppl)
TOL_NO_WORSE = 0.02
TOL_NEAR = 0.05


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_s{seed}"


def command(variant: str, seed: int, threads: int | None, quick: bool, out: Path | None = None) -> list[str]:
    cmd = ["python", "examples/train_lm.py", *(QUICK if quick else SCALE), *VARIANTS[variant][1], "--seed", str(seed)]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += ["--no-plot"]
    if out is not None:
        cmd += ["--out", str(out)]
    return cmd


def run_all(variants, seeds, out_dir: Path, threads, quick: bool) -> list[str]:
    """Run every missing (variant, seed), seed-major (all variants of seed 1 first). Returns the failed runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    todo = [(v, s) for s in seeds for v in variants]
    for i, (v, s) in enumerate(todo, 1):
        out = out_dir / f"{run_name(v, s)}.json"
        if out.exists():
            print(f"[{i}/{len(todo)}] {run_name(v, s)}: done already ({out})")
            continue
        cmd = command(v, s, threads, quick, out)
        argv = [sys.executable, str(SCRIPT), *cmd[2:]]
        print(f"[{i}/{len(todo)}] {run_name(v, s)}: {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode != 0 or not out.exists():
            failed.append(run_name(v, s))
            print(f"  FAILED (exit {r.returncode}):\n{r.stderr[-3000:]}", flush=True)
            continue
        data = json.loads(out.read_text())
        data["reproduce"] = {"variant": v, "seed": s, "label": VARIANTS[v][0], "wall_s": wall,
                             "command": shlex.join(command(v, s, threads, quick)),
                             "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "quick": quick}
        out.write_text(json.dumps(data, indent=1))
        (out_dir / f"{run_name(v, s)}.log").write_text(r.stdout)
        run = data["runs"][-1]
        print(f"  valid {run['val_ppl']:.2f} test {run['test_ppl']:.2f} {run['ms_per_step']:.1f} ms/step "
              f"({wall:.0f} s)", flush=True)
    return failed


# -- tables, plots, verdicts -------------------------------------------------------------------
def load_results(out_dir: Path) -> dict[str, dict[int, dict]]:
    """{variant: {seed: the run dict (+ "reproduce")}} of every JSON in ``out_dir``."""
    res: dict[str, dict[int, dict]] = {}
    for p in sorted(out_dir.glob("*.json")):
        data = json.loads(p.read_text())
        meta = data.get("reproduce")
        if not meta:
            continue
        run = dict(data["runs"][-1], reproduce=meta, config=data.get("config", {}))
        res.setdefault(meta["variant"], {})[int(meta["seed"])] = run
    return res


def steps_per_epoch(cfg: dict) -> int | None:
    """Training steps in one epoch of the run's corpus at its batch x seq (None: unknown)."""
    try:
        data = Path(cfg["data"])
        if not data.is_dir():  # JSON written on another machine: the same corpus in this checkout
            data = ROOT / "examples" / "data" / data.name
        text = (data / "train.txt").read_text(encoding="utf-8")
        n = sum(len(line.split()) + 1 for line in text.splitlines() if line.split())  # words + <eos>
        return (n // cfg["batch"] - 1) // cfg["seq"]
    except (KeyError, OSError, TypeError, ZeroDivisionError):
        return None


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _val(res, v):
    return _mean([r["val_ppl"] for r in res.get(v, {}).values()])


def _seeds(res, v, key="val_ppl"):
    return " / ".join(f"{res[v][s][key]:.1f}" for s in sorted(res.get(v, {})))


def _judge(res, v, limit: float) -> str:
    """"holds" when the mean validation ppl of ``v`` is at most ``limit``; a miss by less than the
    variant's own seed-to-seed difference is called narrow."""
    val = _val(res, v)
    if val <= limit:
        return "holds"
    ppl = [r["val_ppl"] for r in res[v].values()]
    spread = max(ppl) - min(ppl)
    if val - limit < spread:
        return f"does not hold, narrowly ({val - limit:.1f} over, less than its seeds' spread of {spread:.1f})"
    return "does not hold"


def verdicts(res: dict) -> dict[str, str]:
    """One sentence per claim, from the numbers (missing runs: says so)."""
    out = {}
    d = _val(res, "dense")
    have = lambda *vs: all(v in res for v in vs)  # noqa: E731
    spread = (f"; dense's two seeds differ by {abs(res['dense'][1]['val_ppl'] - res['dense'][2]['val_ppl']):.1f}"
              if have("dense") and {1, 2} <= set(res["dense"]) else "")

    def rel(v):
        return (_val(res, v) / d - 1) * 100

    if have("dense", "sd_nr", "sd_nr_rh"):
        parts = []
        for v, name in (("sd_nr", "structured NR"), ("sd_nr_rh", "structured NR+RH")):
            parts.append(f"{name} {_val(res, v):.1f} ({rel(v):+.1f} %): {_judge(res, v, d * (1 + TOL_NO_WORSE))}")
        out["structured_dropout"] = (
            f"Claim: structured dropout is no worse than standard dropout (here: mean validation perplexity within "
            f"{TOL_NO_WORSE:.0%} of dense with standard dropout, {d:.1f}{spread}). " + "; ".join(parts) + ".")
    else:
        out["structured_dropout"] = "Not measured yet (runs missing)."
    if have("dense", *(f"gg_{g}{s}" for g in ("coarse", "fine", "meprop") for s in ("", "_das"))):
        parts = []
        for g in ("coarse", "fine", "meprop"):
            parts.append(f"{g}: {_val(res, f'gg_{g}'):.1f} sparse to the end, {_val(res, f'gg_{g}_das'):.1f} with "
                         f"dense-after-sparse ({rel(f'gg_{g}_das'):+.1f} % vs dense): "
                         f"{_judge(res, f'gg_{g}_das', d * (1 + TOL_NO_WORSE))}")
        out["gate_gradient"] = (
            f"Claim: with dense-after-sparse, sparse gate gradients recover dense accuracy (here: mean validation "
            f"perplexity within {TOL_NO_WORSE:.0%} of dense, {d:.1f}{spread}). " + "; ".join(parts) + ".")
    else:
        out["gate_gradient"] = "Not measured yet (runs missing)."
    if have("dense", "np_gradual80", "np_gradual90"):
        parts = []
        for v, s in (("np_gradual80", "80 %"), ("np_gradual90", "90 %")):
            parts.append(f"{s} sparse {_val(res, v):.1f} ({rel(v):+.1f} %): {_judge(res, v, d * (1 + TOL_NEAR))}")
        out["gradual_pruning"] = (
            f"Claim: 80-90 % sparse LSTMs come near the dense model (here: mean validation perplexity within "
            f"{TOL_NEAR:.0%} of dense, {d:.1f}{spread}). " + "; ".join(parts) + ".")
    else:
        out["gradual_pruning"] = "Not measured yet (runs missing)."
    if have("dense", "st_dst_uniform", "st_static"):
        st, dst = _val(res, "st_static"), _val(res, "st_dst_uniform")
        seeds = sorted(set(res["st_dst_uniform"]) & set(res["st_static"]))
        wins = sum(res["st_dst_uniform"][s]["val_ppl"] < res["st_static"][s]["val_ppl"] for s in seeds)
        ok = dst < st and wins == len(seeds)
        out["dst"] = (
            f"Claim: dynamic sparse training beats a static sparse network with the same number of non-zeros: "
            f"DST 67 % uniform {dst:.1f} vs static {st:.1f} mean validation perplexity (better on {wins} of "
            f"{len(seeds)} seeds): {'holds' if ok else 'does not hold'}. Against dense ({d:.1f}) DST is "
            f"{(dst / d - 1) * 100:+.1f} % ({'matches or beats dense' if dst <= d * (1 + TOL_NO_WORSE) else 'behind dense'}).")
        if have("st_e128_dense", "st_e128_dst_uniform", "st_e128_dst_er"):
            e_d, e_u, e_er = (_val(res, v) for v in ("st_e128_dense", "st_e128_dst_uniform", "st_e128_dst_er"))
            out["dst"] += (
                f" Erdos-Renyi vs uniform (128-d embedding, where their topologies differ): ER {e_er:.1f}, uniform "
                f"{e_u:.1f}, dense {e_d:.1f} ({(e_er / e_u - 1) * 100:+.1f} % ER vs uniform).")
    else:
        out["dst"] = "Not measured yet (runs missing)."
    return out


def write_plots(res: dict, out_dir: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plots: matplotlib is not installed (the project's 'bench' or 'dev' extra)")
        return {}
    paths = {}
    for key, title, variants in PAPERS:
        have = [v for v in variants if v in res]
        if not have:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        colors, lows, highs = {}, [], []
        for v in have:
            base = v.removesuffix("_das")  # dense-after-sparse: dashed, in the colour of its sparse run
            style = dict(color=colors.setdefault(base, f"C{len(colors)}"), ls="--" if v.endswith("_das") else "-")
            seeds = sorted(res[v])
            losses = [res[v][s]["train_loss"] for s in seeds]
            n = min(len(x) for x in losses)
            mean = [_mean([x[i] for x in losses]) for i in range(n)]
            w = max(1, n // 20)
            smooth = [_mean(mean[max(0, i - w + 1): i + 1]) for i in range(n)]
            ax1.plot(range(1, n + 1), smooth, label=VARIANTS[v][0], **style)
            lows.append(min(smooth))
            highs.append(smooth[min(n - 1, max(w, n // 10))])
            curves = [res[v][s]["val_curve"] for s in seeds if res[v][s]["val_curve"]]
            if curves:
                m = min(len(c) for c in curves)
                steps = [c[0] for c in curves[0][:m]]
                ppl = [_mean([c[i][1] for c in curves]) for i in range(m)]
                ax2.plot(steps, ppl, marker="o", ms=3, label=VARIANTS[v][0], **style)
            ax2.plot([n], [_val(res, v)], "*", ms=10, color=style["color"])
        if lows:  # from a tenth of the run on: the first steps' loss would flatten the differences
            ax1.set_ylim(min(lows) - 0.05, max(highs) + 0.05)
        das = [res[v][s]["config"].get("dense_after", 0) for v in have if v.endswith("_das") for s in res[v]]
        if das:
            switch = round(n * (1 - das[0]))
            for ax in (ax1, ax2):
                ax.axvline(switch, color="grey", lw=0.8, ls=":")
            ax1.set_title("training loss (mean of seeds; dotted: dense gradients from here)", fontsize=10)
        if not das:
            ax1.set_title("training loss (mean of seeds)", fontsize=10)
        ax1.set(xlabel="training step", ylabel=f"training loss (nats/word, running mean of {w})")
        ax2.set(xlabel="training step", ylabel="validation perplexity", yscale="log")
        ax2.set_title("validation perplexity (first 20 batches; star: full set, final)", fontsize=10)
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        paths[key] = out_dir / f"{key}.png"
        fig.savefig(paths[key], dpi=90)
        plt.close(fig)
    return paths


def build_markdown(res: dict, out_dir: Path, md_path: Path, quick: bool = False) -> str:
    plots = write_plots(res, out_dir)
    verdict = verdicts(res)
    any_run = next(iter(res["dense"].values())) if "dense" in res else next(
        (r for runs in res.values() for r in runs.values()), None)
    cfg = any_run["config"] if any_run else {}
    meta = any_run["reproduce"] if any_run else {}
    total = sum(r["reproduce"].get("wall_s", 0) for runs in res.values() for r in runs.values())
    n_runs = sum(len(runs) for runs in res.values())
    expected = len(VARIANTS) * 2
    rel_out = os.path.relpath(out_dir, md_path.parent)
    epoch = steps_per_epoch(cfg)
    epoch_note = f" (one epoch is {epoch} steps)" if epoch else ""
    L = ["# Reproducing the papers' quality claims", ""]
    if quick:
        L += ["**Smoke run (`--quick`): tiny model, a few steps; the numbers mean nothing.**", ""]
    L += [
        f"Generated by `python benchmarks/reproduce_papers.py --threads 1` from the JSON in `{rel_out}/` "
        f"({n_runs} of {expected} runs; a rerun skips the runs whose JSON exists).", "",
        "Every run is `examples/train_lm.py` on the shipped Shakespeare corpus (`examples/data/shakespeare`): "
        f"embedding -> 2-layer LSTM ({cfg.get('hidden', '?')} units, tied {cfg.get('emb', '?')}-d embedding and "
        f"decoder) -> softmax over a {cfg.get('vocab', '?')}-word vocabulary (`<unk>`, `<eos>` and the most "
        f"frequent training words), batch "
        f"{cfg.get('batch', '?')} x {cfg.get('seq', '?')} steps of truncated BPTT, {cfg.get('optimizer', '?')} "
        f"lr {cfg.get('lr', '?')}, gradient clipping 0.25, standard dropout 0.3 (embedding, between the layers, "
        f"output) unless a row says otherwise, **{cfg.get('steps', '?')} steps for every run**{epoch_note}, "
        "seeds 1 and 2 (initial weights, dropout stream, DST draws; the batches are the same). "
        "Validation and test perplexity are on the full splits at the end of training, ms/step is the mean "
        "training step (forward, backward, clipping, optimizer and mask step; not evaluation, not the first step) "
        f"with {cfg.get('threads', '?')} torch thread(s) on {meta.get('machine', '?')}, torch "
        f"{cfg.get('torch', '?')}, one run at a time (total {total / 60:.0f} min).", "",
        "**Read these as short-run results**: about one epoch of a small model, far from converged (the papers "
        "train for tens of epochs), two seeds. A claim that \"holds\" here holds at this scale; one that does not "
        "may still hold at convergence, and the other way round.", "",
    ]
    for key, title, variants in PAPERS:
        L += [f"## {title}", ""]
        L += ["| variant | valid ppl (seed 1 / 2) | mean | test ppl (seed 1 / 2) | mean | ms/step | LSTM weights kept |",
              "|---|---|---|---|---|---|---|"]
        for v in variants:
            if v not in res:
                L.append(f"| {VARIANTS[v][0]} | not run yet | | | | | |")
                continue
            runs = list(res[v].values())
            kept = (f"{1 - _mean([r['lstm_weight_sparsity'] for r in runs]):.1%}"
                    if "lstm_weight_sparsity" in runs[0] else "100%")
            L.append(f"| {VARIANTS[v][0]} | {_seeds(res, v)} | {_val(res, v):.1f} | {_seeds(res, v, 'test_ppl')} | "
                     f"{_mean([r['test_ppl'] for r in runs]):.1f} | {_mean([r['ms_per_step'] for r in runs]):.0f} | "
                     f"{kept} |")
        L += ["", f"**Verdict.** {verdict[key]}", ""]
        if key in plots:
            L += [f"![{title}]({os.path.relpath(plots[key], md_path.parent)})", ""]
        L += ["Commands (seed 1; `--seed 2` for the second):", "", "```bash"]
        L += [shlex.join(command(v, 1, cfg.get("threads"), quick)) for v in variants]
        L += ["```", ""]
    L += ["## Notes", "",
          "* The dense baseline (`nn.LSTM`, standard dropout) is one pair of runs shared by all four tables.",
          "* Gate-gradient rows keep the standard dropout (`--sparse-dropout standard`), so they differ from dense "
          "only in the gate gradients; dense-after-sparse makes the last 25 % of the steps dense. The configs are the "
          "example's: coarse `(P=4, R=8, S=4)` drops 50 % of the gate-gradient columns, meProp keeps the top 50 % "
          "of the columns, fine `(My=8, Mx=4, K=2)` drops 2 of the 3 row blocks (8, 8 and 4 rows at batch 20) of "
          "every 4-column slice, 60-80 % of the entries: the sparsest of the three. On the CPU "
          "kernels, gate-gradient sparsity without structured dropout is slower than `nn.LSTM` (the dropped "
          "entries are zeroed, not skipped; docs/benchmarks.md), which the ms/step column shows.",
          "* Weight-sparse rows train through `nn.LSTM` with masked weights (no sparse training kernels), so their "
          "ms/step is dense speed plus the mask bookkeeping; gradual pruning ramps from 10 % to 50 % of the steps "
          "(mask update every 50 steps), DST prunes and regrows every 50 steps with prune rate 0.5 (cosine-decayed), "
          "static keeps DST's initial uniform random topology (`WeightSparsity.static`, same number of non-zeros). "
          "Erdos-Renyi is measured on a model with a 128-d embedding (untied decoder, its own dense baseline): with "
          "emb = hidden every LSTM matrix is 4H x H, ER then gives each the uniform density and, same seed, the "
          "same masks (a run identical to uniform, bit for bit, was measured and dropped). "
          "At 90 % sparsity the evaluation runs the sparse CPU eval kernels (same result up to float32 rounding).",
          f"* Verdict tolerances: \"no worse\" = mean validation perplexity at most {TOL_NO_WORSE:.0%} above dense; "
          f"\"near\" = at most {TOL_NEAR:.0%} above; \"beats\" = lower mean and lower on every seed.", ""]
    text = "\n".join(L)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"tiny smoke run into {QUICK_DIR}/ (not docs/)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (the results use 1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", default=None, help=f"comma-separated variants (of {', '.join(VARIANTS)})")
    ap.add_argument("--out-dir", type=Path, default=None, help=f"JSON per run (default {OUT_DIR.relative_to(ROOT)})")
    ap.add_argument("--md", type=Path, default=None, help=f"the results page (default {RESULTS_MD.relative_to(ROOT)})")
    ap.add_argument("--tables-only", action="store_true", help="run nothing; rebuild the page from the JSON")
    args = ap.parse_args(argv)
    variants = list(VARIANTS)
    if args.only:
        variants = [v.strip() for v in args.only.split(",") if v.strip()]
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            ap.error(f"--only: unknown variant(s) {', '.join(bad)}; known: {', '.join(VARIANTS)}")
    out_dir = args.out_dir or (QUICK_DIR if args.quick else OUT_DIR)
    md = args.md or (out_dir / "results.md" if args.quick else RESULTS_MD)
    failed = [] if args.tables_only else run_all(variants, args.seeds, out_dir, args.threads, args.quick)
    build_markdown(load_results(out_dir), out_dir, md, quick=args.quick)
    print(f"results: {md}")
    if failed:
        print(f"failed runs: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
