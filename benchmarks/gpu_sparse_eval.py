"""GPU time of eval() of a weight-sparse LSTM: the sparse persistent kernels vs nn.LSTM (cuDNN).

    python benchmarks/gpu_sparse_eval.py --bundle bundles/gpu_check          # H 2304, 30 %, batch 4, bf16, T 35
    python benchmarks/gpu_sparse_eval.py --bundle B --hidden 1024 --density 0.1 --batch 8 --json out.json

One forward of ``SparseLSTM(H, H)`` in ``eval()`` under ``torch.inference_mode()``, its input and
recurrent weights pruned at random to ``--density`` (``WeightSparsity("dst")`` masks), side by
side in one process after warm-up, interleaved, timed with CUDA events, medians of
``--repeats``:

* ``nn.LSTM``: ``nn.LSTM.forward`` on the same module and weights (cuDNN; the baseline);
* ``SparseLSTM``: what a user gets with the bundle in use: the persistent kernels when the
  bundle has a matching entry (``last_path == "persistent_eval"``), else nn.LSTM with the reason.

Also the largest difference of the two outputs. Ratios are nn.LSTM's median over the variant's.
Without a CUDA GPU it prints why and exits 0 (``--json`` then records ``skipped``). Not a test:
nothing asserts a time. The bundle needs a persistent entry for the shape (``rnn-sparsify
compile --persistent-eval --hidden-size H --batch B --density D --dtype bfloat16 --arch sm_90``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="kernel bundle with persistent eval entries")
    ap.add_argument("--hidden", type=int, default=2304)
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=35)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import torch

    result = {"config": vars(a)}
    if not torch.cuda.is_available():
        msg = "skipped: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed"
        print(msg)
        result["skipped"] = msg
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0

    from torch import nn

    from rnn_sparsify import SparseLSTM
    from rnn_sparsify.kernels import persistent_eval as pe
    from rnn_sparsify.weight_sparsity import WeightSparsity, attach_weight_sparsity

    if a.bundle:
        pe.use_bundle(a.bundle)
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    m = SparseLSTM(a.hidden, a.hidden, a.layers)
    attach_weight_sparsity(m, WeightSparsity("dst", total_steps=10, target_sparsity=1 - a.density,
                                             weights=("ih", "hh")))
    m = m.to("cuda", dt).eval()
    x = torch.randn(a.seq, a.batch, a.hidden, device="cuda", dtype=dt)
    variants = {"nn.LSTM": lambda: nn.LSTM.forward(m, x)[0], "SparseLSTM": lambda: m(x)[0]}
    times = {k: [] for k in variants}
    with torch.inference_mode():
        outs = {k: f() for k, f in variants.items()}  # warm-up: packing, module load
        for _ in range(3):
            for f in variants.values():
                f()
        for _ in range(a.repeats):
            for k, f in variants.items():
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                f()
                e.record()
                e.synchronize()
                times[k].append(s.elapsed_time(e) * 1000.0)
    path, reason = m.last_path, m.last_eval_reason
    base = statistics.median(times["nn.LSTM"])
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": k, "median_us": med, "per_step_us": med / a.seq, "speedup": base / med,
                     "path": "cuDNN" if k == "nn.LSTM" else path})
    diff = float((outs["SparseLSTM"].double() - outs["nn.LSTM"].double()).abs().max())
    result.update(rows=rows, max_abs_diff=diff, gpu=torch.cuda.get_device_name(0), path=path, reason=reason)
    print(f"{torch.cuda.get_device_name(0)}: H {a.hidden}, density {a.density:.0%}, batch {a.batch}, T {a.seq}, "
          f"{a.dtype}, {a.layers} layer(s); SparseLSTM ran {path} ({reason})")
    print("| variant | median (us) | per step (us) | speedup vs nn.LSTM | path |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_us']:.1f} | {r['per_step_us']:.2f} | {r['speedup']:.2f}x | {r['path']} |")
    print(f"max |SparseLSTM - nn.LSTM| = {diff:.3g}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
