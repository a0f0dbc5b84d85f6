"""CPU wall time of one LSTM training step: SparseLSTM (reference kernels) vs nn.LSTM.

    python benchmarks/cpu_train_step.py --batch 64 --hidden 512 --seq 35 --layers 2 --repeats 7

Variants are timed interleaved (round-robin) in one process, medians reported as ratios to
nn.LSTM measured in the same run. A training step = forward + backward of sum(output * w).
The reference kernels are PyTorch ops on the CPU: this is a baseline for the generated GPU
kernels, not a speed claim.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from rnn_sparsify import GateGradientSparsity, SparseLSTM, StructuredDropout


def variants(args):
    base = nn.LSTM(args.hidden, args.hidden, num_layers=args.layers)
    out = {"nn.LSTM (dense)": base}

    def make(label, sd=None, gg=None, force=False):
        m = SparseLSTM.from_dense(base, structured_dropout=sd, gate_sparsity=gg)
        m.force_sparse_path = force
        out[label] = m

    make("SparseLSTM, nothing sparse (reference path)", force=True)
    make("SparseLSTM, StructuredDropout(0.5, 0.5)", sd=StructuredDropout(0.5, 0.5))
    make("SparseLSTM, coarse P4 R8 S4", gg=GateGradientSparsity.coarse())
    k_half = max(1, -(-args.batch // 8) // 2)  # half of the sub-matrices of a slice
    make(f"SparseLSTM, fine My8 Mx4 K{k_half}", gg=GateGradientSparsity.fine(My=8, Mx=4, K=k_half))
    make("SparseLSTM, SD(0.5, 0.5) + coarse", sd=StructuredDropout(0.5, 0.5), gg=GateGradientSparsity.coarse())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=35)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mods = variants(args)
    x = torch.randn(args.seq, args.batch, args.hidden)
    w = torch.randn(args.seq, args.batch, args.hidden)

    def step(m):
        m.zero_grad(set_to_none=True)
        y, _ = m(x)
        (y * w).sum().backward()

    for m in mods.values():  # warm-up
        step(m)
    times = {k: [] for k in mods}
    for _ in range(args.repeats):
        for k, m in mods.items():
            t0 = time.perf_counter()
            step(m)
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["nn.LSTM (dense)"])
    rows = []
    print(f"batch {args.batch}, hidden {args.hidden}, seq {args.seq}, layers {args.layers}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'variant':48s} {'median ms':>10s} {'vs nn.LSTM':>11s}")
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": k, "median_s": med, "ratio_vs_nn_lstm": med / base, "runs": ts})
        print(f"{k:48s} {med * 1e3:10.1f} {med / base:10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
