"""GPU time of eval() of a weight-sparse LSTM: the sparse persistent kernels vs nn.LSTM (cuDNN).

    python benchmarks/gpu_sparse_eval.py --bundle bundles/gpu_check          # H 2304, 30 %, batch 4, bf16, T 35
    python benchmarks/gpu_sparse_eval.py --bundle B --hidden 1024 --density 0.1 --batch 8 --json out.json

One forward of ``SparseLSTM(H, H)`` in ``eval()`` under ``torch.inference_mode()``, its input and
recurrent weights pruned at random to ``--density`` (``WeightSparsity("dst")`` masks), side by
side in one process after warm-up, interleaved, timed with CUDA events, medians of
``--repeats``:

* ``nn.LSTM``: ``nn.LSTM.forward`` on the same module and weights (cuDNN; the baseline);
* ``persistent kernels``: ``SparseLSTM`` with the routing set to ``always``
  (``persistent_eval.set_eval_mode``, as ``RNN_SPARSIFY_PERSISTENT_EVAL=always``): the kernels
  themselves whenever the bundle has a matching entry (``last_path == "persistent_eval"``), else
  nn.LSTM with the reason;
* ``SparseLSTM (auto)``: what a user gets by default: the first call measures both paths and
  the faster runs from then on; the routing verdict (the times it measured, the winner) is
  printed and recorded as ``routing``.

Also the largest difference of the kernels' output from nn.LSTM's. Ratios are nn.LSTM's median
over the variant's.
Without a CUDA GPU it prints why and exits 0 (``--json`` then records ``skipped``);
``--selfcheck`` runs the same code on the CPU at a tiny size (float64: nn.LSTM everywhere; the
times mean nothing). Not a test: nothing asserts a time. The bundle needs a persistent entry for the shape (``rnn-sparsify
compile --persistent-eval --hidden-size H --batch B --density D --dtype bfloat16 --arch sm_90``).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from rnn_sparsify.codegen.bench import skipped_without_gpu, write_json


KERNELS, AUTO, BASE = "persistent kernels", "SparseLSTM (auto)", "nn.LSTM"


def cuda_stopwatch():
    import torch

    s = torch.cuda.Event(enable_timing=True)
    s.record()

    def stop():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        e.synchronize()
        return s.elapsed_time(e)

    return stop


def wall_stopwatch():
    import time

    t0 = time.perf_counter()
    return lambda: (time.perf_counter() - t0) * 1e3


def measure(a, device, dt, stopwatch) -> dict:
    """Build the pruned module on ``device``/``dt``, warm up, time the variants interleaved
    (``stopwatch() -> stop() -> ms``); the rows, the kernels' largest difference from nn.LSTM
    and the routing verdict of the auto variant."""
    import torch
    from torch import nn

    from rnn_sparsify import SparseLSTM
    from rnn_sparsify.kernels import persistent_eval as pe
    from rnn_sparsify.weight_sparsity import WeightSparsity, attach_weight_sparsity

    torch.manual_seed(0)
    m = SparseLSTM(a.hidden, a.hidden, a.layers)
    attach_weight_sparsity(m, WeightSparsity("dst", total_steps=10, target_sparsity=1 - a.density,
                                             weights=("ih", "hh")))
    m = m.to(device, dt).eval()
    x = torch.randn(a.seq, a.batch, a.hidden, device=device, dtype=dt)

    def sparse(mode):
        def f():
            pe.set_eval_mode(mode)
            try:
                return m(x)[0], m.last_path
            finally:
                pe.set_eval_mode(None)
        return f

    variants = {BASE: lambda: (nn.LSTM.forward(m, x)[0], "cuDNN"), KERNELS: sparse("always"), AUTO: sparse("auto")}
    times = {k: [] for k in variants}
    seen, reasons, outs, routing = {k: set() for k in variants}, {}, {}, None
    with torch.inference_mode():
        for k, f in variants.items():  # warm-up: packing, module load; the auto variant measures here
            outs[k], p = f()
            seen[k].add(p)
            reasons[k] = m.last_eval_reason if k != BASE else "baseline"
            if k == AUTO:
                routing = getattr(m, "last_eval_routing", None)
        for _ in range(3):
            for f in variants.values():
                f()
        for _ in range(a.repeats):
            for k, f in variants.items():
                stop = stopwatch()
                _, p = f()
                times[k].append(stop() * 1000.0)
                seen[k].add(p)  # one path per variant expected; several are shown, not hidden
    paths = {k: " / ".join(sorted(v)) for k, v in seen.items()}
    base = statistics.median(times[BASE])
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": k, "median_us": med, "per_step_us": med / a.seq, "speedup": base / med,
                     "path": paths[k], "reason": reasons[k]})
    verdicts = [{"key": [str(v) for v in key], "persistent_ms": v.persistent_ms, "dense_ms": v.dense_ms,
                 "winner": v.winner, "text": v.text()} for key, v in pe.routing_verdicts().items()]
    diff = float((outs[KERNELS].double() - outs[BASE].double()).abs().max())
    return {"rows": rows, "max_abs_diff": diff, "path": paths[KERNELS], "reason": reasons[KERNELS],
            "routing": routing, "routing_verdicts": verdicts, "auto_reason": reasons[AUTO]}


def report(a, res, where: str) -> str:
    lines = [f"{where}: H {a.hidden}, density {a.density:.0%}, batch {a.batch}, T {a.seq}, {a.dtype}, "
             f"{a.layers} layer(s); the kernels variant ran {res['path']} ({res['reason']})",
             f"routing verdict (auto, first call): {res['routing'] or 'not measured: ' + res['auto_reason']}",
             "| variant | median (us) | per step (us) | speedup vs nn.LSTM | path |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['median_us']:.1f} | {r['per_step_us']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['path']} |")
    lines.append(f"max |persistent kernels - nn.LSTM| = {res['max_abs_diff']:.3g}")
    return "\n".join(lines)


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
    ap.add_argument("--selfcheck", action="store_true", help="the same code on the CPU at a tiny size (no timing claims)")
    a = ap.parse_args(argv)

    import torch

    result = {"config": vars(a)}
    if a.selfcheck:
        a.hidden, a.batch, a.seq, a.repeats, a.dtype = 16, 2, 3, 2, "float64"
        res = measure(a, torch.device("cpu"), torch.float64, wall_stopwatch)
        result.update(selfcheck=True, **res)
        print(report(a, res, "selfcheck on the CPU (float64, tiny; the times mean nothing)"))
        write_json(a.json, result)
        return 0
    if skipped_without_gpu(result, a.json):
        return 0

    from rnn_sparsify.kernels import persistent_eval as pe

    if a.bundle:
        pe.use_bundle(a.bundle)
    res = measure(a, torch.device("cuda"), getattr(torch, a.dtype), cuda_stopwatch)
    gpu = torch.cuda.get_device_name(0)
    result.update(gpu=gpu, **res)
    print(report(a, res, gpu))
    write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
