"""CPU wall time of one LSTM training step: SparseLSTM on its selected backend vs nn.LSTM.

    python benchmarks/cpu_train_step.py --hidden 650 --batch 20 --threads 1 2
    python benchmarks/cpu_train_step.py --matrix --json docs/results/cpu_train_step.json \
        --plot docs/results/cpu_speedup.png

A training step = forward + backward of ``sum(y * w)`` with every weight/bias gradient and dx.
Baseline: ``nn.LSTM(H, H, L, dropout=p)`` (oneDNN) with its standard inter-layer dropout at the
variant's p. Variants run interleaved (round-robin) in one process per thread count, after
warm-up (which also compiles the kernels, untimed); medians of ``--repeats`` steps are
reported as ratios to the baseline measured in the same process. Each row also says which
backend ran (``last_backend``). Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _variants(H, L, p):
    import torch
    from torch import nn

    from rnn_sparsify import GateGradientSparsity, SparseLSTM, StructuredDropout

    torch.manual_seed(0)
    base = nn.LSTM(H, H, num_layers=L, dropout=p if L > 1 else 0.0)
    out = {f"nn.LSTM (dropout {p})": base}

    def make(label, sd=None, gg=None):
        out[label] = SparseLSTM.from_dense(base, structured_dropout=sd, gate_sparsity=gg)

    out["SparseLSTM, nothing sparse"] = SparseLSTM.from_dense(base)
    make(f"SD({p}, {p})", sd=StructuredDropout(p, p))
    make("coarse P4 R8 S4", gg=GateGradientSparsity.coarse())
    make("fine My8 Mx4 K1", gg=GateGradientSparsity.fine(My=8, Mx=4, K=1))
    make("meProp keep 0.5", gg=GateGradientSparsity.meprop(0.5))
    make(f"SD({p}, {p}) + coarse", sd=StructuredDropout(p, p), gg=GateGradientSparsity.coarse())
    return out


def run_one(H, B, T, L, p, threads, repeats, only=None):
    """One process: every variant interleaved at one shape and thread count."""
    import torch

    torch.set_num_threads(threads)
    mods = _variants(H, L, p)
    if only:
        mods = {k: m for k, m in mods.items() if k.startswith("nn.LSTM") or any(o in k for o in only)}
    torch.manual_seed(1)
    x = torch.randn(T, B, H, requires_grad=True)
    w = torch.randn(T, B, H)

    def step(m):
        m.zero_grad(set_to_none=True)
        x.grad = None
        y, _ = m(x)
        (y * w).sum().backward()

    for m in mods.values():  # warm-up (compiles kernels on first use)
        step(m)
        step(m)
    times = {k: [] for k in mods}
    for _ in range(repeats):
        for k, m in mods.items():
            t0 = time.perf_counter()
            step(m)
            times[k].append(time.perf_counter() - t0)
    base_key = next(iter(mods))
    base = statistics.median(times[base_key])
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": k, "hidden": H, "batch": B, "seq": T, "layers": L, "p": p,
                     "threads": threads, "median_ms": med * 1e3, "ratio_vs_nn_lstm": med / base,
                     "speedup": base / med, "backend": getattr(mods[k], "last_backend", None) or "nn.LSTM",
                     "path": getattr(mods[k], "last_path", None) or "dense", "runs_ms": [t * 1e3 for t in ts]})
    return rows


def machine() -> str:
    import torch

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from rnn_sparsify.kernels.cpu_runtime import host_isa

    return (f"{cpu}, {os.cpu_count()} cores, ISA class {host_isa()}, {platform.machine()}, "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")


def run_child(script: str, args_list):
    """Run ``script --child JSON`` in a fresh process (its own thread pools and caches) and
    return the JSON its last line prints."""
    cmd = [sys.executable, script, "--child", json.dumps(args_list)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"benchmark child failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child(args_list):
    return run_child(__file__, args_list)


MATRIX = [  # (hidden, batch, p) x threads 1, 2
    (256, 20, 0.5), (256, 64, 0.5), (650, 20, 0.5), (650, 64, 0.5), (1500, 20, 0.5),
]
SWEEP = [(650, 20, 0.25), (650, 20, 0.65), (256, 20, 0.25), (256, 20, 0.65)]


def table(rows) -> str:
    out = ["| hidden | batch | threads | variant | backend | median ms | vs nn.LSTM | speed-up |",
           "|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['hidden']} | {r['batch']} | {r['threads']} | {r['variant']} | {r['backend']} | "
                   f"{r['median_ms']:.1f} | {r['ratio_vs_nn_lstm']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, th in zip(axes, (1, 2)):
        for H in sorted({r["hidden"] for r in rows}):
            pts = sorted((r["p"], r["speedup"]) for r in rows
                         if r["hidden"] == H and r["threads"] == th and r["batch"] == 20
                         and r["variant"].startswith("SD(") and "coarse" not in r["variant"])
            if pts:
                ax.plot([p for p, _ in pts], [s for _, s in pts], "o-", label=f"hidden {H}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{th} thread{'s' if th > 1 else ''}: SD(p, p), 2 layers, batch 20, T 35")
        ax.set_xlabel("dropout rate p (input and recurrent)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up vs nn.LSTM(dropout=p)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=650)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--seq", type=int, default=35)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--p", type=float, default=0.5, help="dropout rate (structured and baseline)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--matrix", action="store_true", help="the documented matrix (docs/benchmarks.md)")
    ap.add_argument("--only", nargs="*", default=None, help="variants whose label contains one of these")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG: speed-up vs dropout rate per hidden size")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return None
    shapes = (MATRIX + SWEEP) if args.matrix else [(args.hidden, args.batch, args.p)]
    rows = []
    print(machine(), flush=True)
    for H, B, p in shapes:
        for th in args.threads:
            only = args.only if not (args.matrix and (H, B, p) in SWEEP) else ["SD("]
            got = _child([H, B, args.seq, args.layers, p, th, args.repeats, only])
            rows.extend(got)
            print(table(got).split("\n", 2)[2], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
