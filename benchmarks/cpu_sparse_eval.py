"""CPU wall time of eval() of a weight-sparse LSTM: SparseLSTM (sparse eval kernels) vs nn.LSTM.

    python benchmarks/cpu_sparse_eval.py                      # 2x650, T 35, batch 1/4/20, 70/90 %
    python benchmarks/cpu_sparse_eval.py --json docs/results/cpu_sparse_eval.json \
        --plot docs/results/cpu_sparse_eval.png

One forward of ``SparseLSTM(H, H, L)`` in ``eval()`` under ``torch.no_grad()``, its weights
pruned at random to the given sparsity by ``WeightSparsity("dst", target_sparsity=s)`` (the
masks of a DST run at that sparsity). Variants, interleaved (round-robin) in one process per
thread count after warm-up (which compiles the kernels, untimed), medians of ``--repeats``:

* ``nn.LSTM``: ``nn.LSTM.forward`` on the same module and weights (oneDNN; the baseline);
* ``SparseLSTM (auto)``: what a user gets, the sparse kernels or nn.LSTM by the density rule
  (``rnn_sparsify.kernels.cpu_sparse_eval.density_limit``), with the path that ran;
* ``sparse kernels (forced)``: the sparse kernels whatever the density (the rule overridden),
  to show the break-even the rule is set from;
* ``torch.sparse_csr loop``: the floor of the CPU fast-path issue, a 20-line Python loop of
  ``torch.sparse.mm`` on the same weights (not a library path).

Ratios are to ``nn.LSTM`` in the same process. Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_one(H, L, T, B, sparsity, threads, repeats):
    import torch
    from torch import nn

    from rnn_sparsify import SparseLSTM
    from rnn_sparsify.kernels import cpu_sparse_eval as cse
    from rnn_sparsify.weight_sparsity import WeightSparsity, attach_weight_sparsity

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = SparseLSTM(H, H, L)
    attach_weight_sparsity(m, WeightSparsity("dst", total_steps=100, target_sparsity=sparsity))
    m.eval()
    x = torch.randn(T, B, H)
    ws = {}
    for layer in range(L):
        for k in ("ih", "hh"):
            ws[k, layer] = getattr(m, f"weight_{k}_l{layer}").detach().to_sparse_csr()

    def csr_loop():
        inp = x
        for layer in range(L):
            bias = getattr(m, f"bias_ih_l{layer}") + getattr(m, f"bias_hh_l{layer}")
            n = inp.shape[2]
            pre = torch.sparse.mm(ws["ih", layer], inp.reshape(-1, n).t()).t().reshape(T, B, 4 * H) + bias
            h = torch.zeros(B, H)
            c = torch.zeros(B, H)
            outs = []
            for t in range(T):
                g = pre[t] + torch.sparse.mm(ws["hh", layer], h.t()).t()
                i, f, gg, o = g.chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            inp = torch.stack(outs)
        return inp

    def forced():
        os.environ["RNN_SPARSIFY_EVAL_DENSITY_LIMIT"] = "1"
        try:
            return m(x)
        finally:
            del os.environ["RNN_SPARSIFY_EVAL_DENSITY_LIMIT"]

    variants = {
        "nn.LSTM": lambda: nn.LSTM.forward(m, x),
        "SparseLSTM (auto)": lambda: m(x),
        "sparse kernels (forced)": forced,
        "torch.sparse_csr loop": csr_loop,
    }
    paths = {}
    with torch.no_grad():
        ref = nn.LSTM.forward(m, x)[0]
        for k, f in variants.items():  # warm-up, and the check that every variant agrees
            out = f()
            out = out[0] if isinstance(out, tuple) else out
            err = float((out - ref).abs().max() / ref.abs().max())
            assert err < 1e-4, (k, err)
            f()
            paths[k] = (m.last_path, getattr(m, "last_eval_reason", "")) if k != "nn.LSTM" else ("dense", "")
            if k == "SparseLSTM (auto)":
                auto = (m.last_path, m.last_eval_backend, m.last_eval_reason)
        times = {k: [] for k in variants}
        for _ in range(repeats):
            for k, f in variants.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["nn.LSTM"])
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": k, "hidden": H, "layers": L, "seq": T, "batch": B, "sparsity": sparsity,
                     "threads": threads, "median_ms": med * 1e3, "speedup": base / med,
                     "path": auto[0] if k == "SparseLSTM (auto)" else ("sparse_eval" if "kernels" in k else "-"),
                     "reason": auto[2] if k == "SparseLSTM (auto)" else "",
                     "runs_ms": [t * 1e3 for t in ts]})
    return rows


def table(rows) -> str:
    out = ["| sparsity | batch | threads | variant | path | median ms | speed-up vs nn.LSTM |",
           "|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['sparsity']:.0%} | {r['batch']} | {r['threads']} | {r['variant']} | {r['path']} | "
                   f"{r['median_ms']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ths = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(ths), figsize=(5 * len(ths), 4), sharey=True, squeeze=False)
    for ax, th in zip(axes[0], ths):
        for ci, B in enumerate(sorted({r["batch"] for r in rows})):
            for variant, style in (("sparse kernels (forced)", "o-"), ("SparseLSTM (auto)", "s--")):
                pts = sorted((r["sparsity"], r["speedup"]) for r in rows
                             if r["threads"] == th and r["batch"] == B and r["variant"] == variant)
                if pts:
                    ax.plot([100 * s for s, _ in pts], [v for _, v in pts], style, color=f"C{ci}",
                            label=f"batch {B}, {'kernels' if 'forced' in variant else 'auto'}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{th} thread{'s' if th > 1 else ''}: eval, 2x{rows[0]['hidden']}, T {rows[0]['seq']}")
        ax.set_xlabel("weight sparsity (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up vs nn.LSTM")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=650)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=35)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 20])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG: speed-up vs sparsity per batch")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only redraw --plot from a --json file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["rows"], args.plot)
        return None
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return None
    from cpu_train_step import machine, run_child

    print(machine(), flush=True)
    rows = []
    for th in args.threads:
        for B in args.batch:
            for s in args.sparsity:
                got = run_child(__file__, [args.hidden, args.layers, args.seq, B, s, th, args.repeats])
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
