"""GPU time of the issue's two sparse training targets vs nn.LSTM (cuDNN), side by side.

    python benchmarks/gpu_train_step.py --bundle bundles/gpu_check             # both targets
    python benchmarks/gpu_train_step.py --bundle B --only backward --repeats 20 --json out.json
    python benchmarks/gpu_train_step.py --selfcheck                            # CPU, tiny sizes, no timing

Two targets (issue 9, "Benchmarks"), each in ``--dtype`` (bfloat16) on the same weights as the
baseline, timed in one process after warm-up, interleaved (round-robin), with CUDA events;
medians of ``--repeats``; ratio = nn.LSTM's median / the variant's:

* ``step``: one training step (forward + backward of ``sum(y * g)``, ``g`` a fixed random
  tensor, every weight gradient and ``dx``) of ``SparseLSTM(H, H, L)`` with
  ``StructuredDropout(p, p)``: ``--step-hidden 1500 --step-layers 2 --step-batch 20 --seq 35
  --p 0.65`` (the issue's goal: >= 1.8x). Baseline: ``nn.LSTM(H, H, L, dropout=p)`` (cuDNN, its
  own inter-layer dropout at the same rate), the weights the sparse model was copied from.
* ``backward``: the backward alone (the forward runs before the timed region) of
  ``SparseLSTM(H, H)`` with ``GateGradientSparsity.coarse(4, 8, 4)``: ``--bwd-hidden 512
  --bwd-batch 64`` (goal: >= 1.5x), vs ``nn.LSTM``'s backward on the same weights.

Variants of each target:

* ``nn.LSTM (cuDNN)``: the baseline;
* ``SparseLSTM``: what a user gets with the bundle in use (``cuda_backend.use_bundle``): the
  layer rule list picks the persistent training loops (``persistent_train``) when the bundle
  has them for the call, else the per-step composition of the bundle's GEMM kernels;
* ``SparseLSTM, per-step GEMMs``: the same with the ``persistent_train`` rule removed (the
  bundle's per-GEMM kernels, ``tvm_cuda``, or the reference GEMMs where it has none).

Every row says what ran, so a ratio is never attributed to the wrong kernels: the layer
backend of every layer call (``layers``: ``persistent_train`` / ``tvm_cuda`` / ``reference``),
the rule verdicts of the last layer call (``SparseLSTM.last_backend_reasons``) and, for the
GEMM backend, how many GEMM calls of the last warm-up step ran on a kernel or on the reference
path (``CudaKernelBackend.summary()``). Without a CUDA GPU it prints why and exits 0 (``--json``
then records ``skipped``). Not a test: nothing asserts a time. The bundle needs the kernels of
:func:`bundle_requests` (``scripts/gpu_check.sh prepare`` builds them for sm_90).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager

from rnn_sparsify.codegen.bench import skipped_without_gpu, write_json

BASE = "nn.LSTM (cuDNN)"
AUTO = "SparseLSTM"
PER_STEP = "SparseLSTM, per-step GEMMs"
GOALS = {"step": 1.8, "backward": 1.5}  # the targets (ratio to nn.LSTM)
COARSE = (4, 8, 4)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="kernel bundle (per-GEMM kernels and persistent training loops)")
    ap.add_argument("--only", choices=["step", "backward"], default=None, help="one target only")
    ap.add_argument("--step-hidden", type=int, default=1500)
    ap.add_argument("--step-layers", type=int, default=2)
    ap.add_argument("--step-batch", type=int, default=20)
    ap.add_argument("--p", type=float, default=0.65, help="structured dropout rate (input and recurrent)")
    ap.add_argument("--bwd-hidden", type=int, default=512)
    ap.add_argument("--bwd-batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=35)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--selfcheck", action="store_true",
                    help="run both targets once on the CPU at tiny sizes (no timing claims; checks the set-up code)")
    return ap


def check_args(a) -> None:
    """Clear errors for values no run can use (before anything is built)."""
    for name in ("step_hidden", "step_layers", "step_batch", "bwd_hidden", "bwd_batch", "seq", "repeats"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 1:
        raise SystemExit(f"--warmup must be >= 1 (the first call loads the kernels), got {a.warmup}")
    if not 0 < a.p < 1:
        raise SystemExit(f"--p must be in (0, 1), got {a.p}")
    if (4 * a.bwd_hidden) % COARSE[0]:
        raise SystemExit(f"--bwd-hidden {a.bwd_hidden}: 4 * hidden must be a multiple of P = {COARSE[0]}")


# -- what the bundle must hold ------------------------------------------------------------

def bundle_requests(step_hidden=1500, step_layers=2, step_batch=20, p=0.65, bwd_hidden=512, bwd_batch=64,
                    seq=35, dtype="bfloat16"):
    """``(LSTMSpecs, PersistentTrainRequests)`` of the two targets: the per-GEMM kernels of the
    per-step path and the persistent loops (fwd + bwd) of the ``persistent_train`` rule.
    ``scripts/gpu_check.sh prepare`` builds these (sm_90: the 1500 forward loop does not fit an
    A100's shared memory)."""
    from rnn_sparsify import GateGradientSparsity, StructuredDropout
    from rnn_sparsify.codegen.lstm_spec import LSTMSpec
    from rnn_sparsify.codegen.persistent_train import train_request

    specs = [
        LSTMSpec(input_size=step_hidden, hidden_size=step_hidden, batch=step_batch, seq_len=seq,
                 num_layers=step_layers, dtype=dtype, structured_dropout={"p_input": p, "p_recurrent": p},
                 name=f"train_step_h{step_hidden}_b{step_batch}"),
        LSTMSpec(input_size=bwd_hidden, hidden_size=bwd_hidden, batch=bwd_batch, seq_len=seq, dtype=dtype,
                 gate_sparsity={"mode": "coarse", "P": COARSE[0], "R": COARSE[1], "S": COARSE[2]},
                 name=f"train_bwd_coarse_h{bwd_hidden}_b{bwd_batch}"),
    ]
    train = [train_request(step_hidden, step_batch, StructuredDropout(p, p), None, dtype),
             train_request(bwd_hidden, bwd_batch, None, GateGradientSparsity.coarse(*COARSE), dtype)]
    return specs, train


# -- models --------------------------------------------------------------------------------

def build_step_models(hidden, layers, p, device, dtype, seed=0):
    """``(nn.LSTM(dropout=p), SparseLSTM with StructuredDropout(p, p))`` on the same weights,
    in training mode, on ``device``/``dtype``."""
    import torch
    from torch import nn

    from rnn_sparsify import SparseLSTM, StructuredDropout

    torch.manual_seed(seed)
    base = nn.LSTM(hidden, hidden, num_layers=layers, dropout=p if layers > 1 else 0.0)
    sparse = SparseLSTM.from_dense(base, structured_dropout=StructuredDropout(p, p))
    return base.to(device, dtype).train(), sparse.to(device, dtype).train()


def build_backward_models(hidden, device, dtype, coarse=COARSE, seed=0):
    """``(nn.LSTM, SparseLSTM with GateGradientSparsity.coarse(*coarse))`` on the same weights."""
    import torch
    from torch import nn

    from rnn_sparsify import GateGradientSparsity, SparseLSTM

    torch.manual_seed(seed)
    base = nn.LSTM(hidden, hidden)
    sparse = SparseLSTM.from_dense(base, gate_sparsity=GateGradientSparsity.coarse(*coarse))
    return base.to(device, dtype).train(), sparse.to(device, dtype).train()


@contextmanager
def without_layer_rule(name):
    """The layer rule list without ``name`` (here: ``persistent_train``) for the duration."""
    from rnn_sparsify.kernels import layer

    saved = layer._LAYER_RULES
    layer.unregister_layer_rule(name)
    try:
        yield
    finally:
        layer._LAYER_RULES = saved


@contextmanager
def recording_layer_backends(out: list):
    """Appends the name of the layer backend of every layer call (all layers, both directions)."""
    from rnn_sparsify import lstm_function

    orig = lstm_function.select_layer_backend

    def rec(problem, **kw):
        be, verdicts = orig(problem, **kw)
        out.append(be.name)
        return be, verdicts

    lstm_function.select_layer_backend = rec
    try:
        yield
    finally:
        lstm_function.select_layer_backend = orig


def _gemm_summary(device):
    """The GEMM backend's per-method path counts (None without a loaded bundle)."""
    if device.type != "cuda":
        return None
    from rnn_sparsify.kernels import cuda_backend

    be = cuda_backend.backend_for(device)
    return None if be is None else be.summary()


def _diff(after, before):
    if after is None:
        return None
    before = before or {}
    out = {}
    for method, counts in after.items():
        d = {k: v - before.get(method, {}).get(k, 0) for k, v in counts.items()}
        d = {k: v for k, v in d.items() if v}
        if d:
            out[method] = d
    return out


def make_variants(target, base, sparse, x, g):
    """``{label: (setup, timed)}``: ``setup()`` runs before the timed region, ``timed()`` is timed.
    ``step``: zero grads | forward + backward. ``backward``: zero grads + forward | backward."""
    import torch
    from torch import nn

    def fwd(m):
        return nn.LSTM.forward(m, x)[0] if m is base else m(x)[0]

    def ctx(label):
        return without_layer_rule("persistent_train") if label == PER_STEP else _null()

    variants = {}
    for label, m in ((BASE, base), (AUTO, sparse), (PER_STEP, sparse)):
        held = {}

        def setup(m=m, label=label, held=held):
            m.zero_grad(set_to_none=True)
            x.grad = None
            if target == "backward":
                with ctx(label):
                    held["y"] = fwd(m)

        def timed(m=m, label=label, held=held):
            with ctx(label):
                if target == "backward":
                    torch.autograd.backward(held.pop("y"), g)
                else:
                    torch.autograd.backward(fwd(m), g)

        variants[label] = (setup, timed)
    return variants


@contextmanager
def _null():
    yield


def cuda_timer(setup, timed) -> float:
    """Milliseconds of ``timed()`` by CUDA events (``setup()`` before, untimed, synchronized)."""
    import torch

    setup()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    timed()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def wall_timer(setup, timed) -> float:
    """Milliseconds of ``timed()`` by the wall clock (the CPU self-check)."""
    setup()
    t0 = time.perf_counter()
    timed()
    return (time.perf_counter() - t0) * 1e3


def run_target(target, base, sparse, x, g, *, repeats, warmup, timer, device):
    """Warm-up, then ``repeats`` interleaved rounds of every variant; one row per variant with
    the median, the ratio to nn.LSTM and what ran."""
    variants = make_variants(target, base, sparse, x, g)
    info, failed = {}, []
    for label, (setup, timed) in variants.items():
        try:
            for i in range(warmup):
                layers = []
                before = _gemm_summary(device)
                with recording_layer_backends(layers):
                    timer(setup, timed)
                if i == warmup - 1:  # what the last warm-up call ran = what the timed calls run
                    info[label] = {"layers": layers if label != BASE else ["cuDNN"],
                                   "gemm_paths": None if label == BASE else _diff(_gemm_summary(device), before),
                                   "reasons": None if label == BASE else [list(v) for v in sparse.last_backend_reasons],
                                   "path": "cuDNN" if label == BASE else sparse.last_path}
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the others still run
            if label == BASE:
                raise
            failed.append({"variant": label, "error": f"{type(e).__name__}: {e}"})
    variants = {k: v for k, v in variants.items() if k in info}
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for label, (setup, timed) in variants.items():
            times[label].append(timer(setup, timed))
    base_med = statistics.median(times[BASE])
    rows = []
    for label, ts in times.items():
        med = statistics.median(ts)
        backends = sorted(set(info[label]["layers"]))
        rows.append({"variant": label, "median_ms": med, "speedup": base_med / med,
                     "backend": "+".join(backends) or "?", **info[label], "runs_ms": ts})
    return rows + failed


def describe(target, a) -> str:
    if target == "step":
        return (f"training step, {a.step_layers}x{a.step_hidden}, batch {a.step_batch}, T {a.seq}, structured "
                f"dropout {a.p}/{a.p}, {a.dtype}")
    return (f"LSTM backward, coarse gate sparsity {'/'.join(map(str, COARSE))}, H {a.bwd_hidden}, batch "
            f"{a.bwd_batch}, T {a.seq}, {a.dtype}")


def run_all(a, device, dtype, timer) -> list[dict]:
    """Both targets (or ``--only``): ``[{target, shape, goal, rows}]``."""
    import torch

    out = []
    for target in ("step", "backward"):
        if a.only and a.only != target:
            continue
        if target == "step":
            base, sparse = build_step_models(a.step_hidden, a.step_layers, a.p, device, dtype)
            H, B = a.step_hidden, a.step_batch
        else:
            base, sparse = build_backward_models(a.bwd_hidden, device, dtype)
            H, B = a.bwd_hidden, a.bwd_batch
        torch.manual_seed(1)
        x = torch.randn(a.seq, B, H, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(a.seq, B, H, device=device, dtype=dtype)
        try:
            rows = run_target(target, base, sparse, x, g, repeats=a.repeats, warmup=a.warmup, timer=timer,
                              device=device)
        except Exception as e:  # noqa: BLE001 - the other target still runs; main's exit code says so
            import traceback

            rows = [{"variant": "(all)", "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()[-3000:]}]
        out.append({"target": target, "shape": describe(target, a), "goal": GOALS[target], "rows": rows})
    return out


def errors(results) -> list:
    return [f"{r['target']}: {row['variant']}: {row['error']}" for r in results for row in r["rows"] if "error" in row]


def markdown(results, head: str) -> str:
    lines = [head, ""]
    for r in results:
        lines += [f"## {r['shape']} (goal: >= {r['goal']}x vs nn.LSTM)", "",
                  "| variant | median (ms) | speedup vs nn.LSTM | layer backends | GEMM paths (last warm-up step) |",
                  "|---|---|---|---|---|"]
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {row['variant']} | failed: {row['error']} | | | |")
                continue
            gp = row["gemm_paths"]
            gp = "; ".join(f"{m}: {dict(c)}" for m, c in gp.items()) if gp else "-"
            lines.append(f"| {row['variant']} | {row['median_ms']:.3f} | {row['speedup']:.2f}x | "
                         f"{', '.join(row['layers'])} | {gp} |")
        for row in r["rows"]:
            if row.get("reasons"):
                lines.append(f"\n{row['variant']}: rule verdicts (last layer call): "
                             + "; ".join(f"{n}: {w}" for n, w in row["reasons"]))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    check_args(a)
    import torch

    result = {"config": vars(a)}
    if a.selfcheck:  # the set-up and bookkeeping code on the CPU at tiny sizes; times mean nothing
        a.step_hidden, a.step_layers, a.step_batch, a.bwd_hidden, a.bwd_batch, a.seq = 8, 2, 3, 8, 4, 3
        a.repeats, a.warmup, a.dtype = 1, 1, "float64"
        res = run_all(a, torch.device("cpu"), torch.float64, wall_timer)
        result.update(selfcheck=True, results=res)
        print(markdown(res, "selfcheck on the CPU (float64, tiny sizes; the times mean nothing)"))
        write_json(a.json, result)
        return 1 if errors(res) else 0
    if skipped_without_gpu(result, a.json):
        return 0

    from rnn_sparsify.kernels import cuda_backend

    if a.bundle:
        cuda_backend.use_bundle(a.bundle)
    dev = torch.device("cuda", torch.cuda.current_device())
    res = run_all(a, dev, getattr(torch, a.dtype), cuda_timer)
    gpu = torch.cuda.get_device_name(dev)
    result.update(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  bundle_errors=cuda_backend.load_errors(), results=res)
    head = (f"# Training-step benchmark\n\n{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
            f"{result['cudnn']}, bundle {a.bundle}; CUDA events, medians of {a.repeats} interleaved runs after "
            f"{a.warmup} warm-up runs each")
    print(markdown(res, head))
    write_json(a.json, result)
    for err in errors(res):
        print(f"error: {err}", file=sys.stderr)
    return 1 if errors(res) else 0


if __name__ == "__main__":
    sys.exit(main())
