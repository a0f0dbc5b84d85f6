"""GPU benchmark of the generated kernels (``rnn-sparsify bench``; needs CUDA, not TVM).

For each configuration (batch x hidden, sequence ``T``, 50 % of units kept) it times, with CUDA
events and medians, side by side in one run:

* each indexed GEMM on the bundle's kernel vs the dense cuBLAS GEMM of the full size vs the
  torch gather + matmul reference (whole-sequence GEMMs: forward input projection,
  backward-data for ``dx``, weight gradient; and the per-step recurrent GEMM);
* one training step (forward + backward) of ``SparseLSTM`` on the kernel backend vs
  ``nn.LSTM`` (cuDNN) with the same dropout rate on its input.

and writes a markdown table with the device and the command. Build the bundle first with
:func:`bench_lstm_specs` (``scripts/gpu_check.sh prepare`` does it).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import BundleError, CodegenError
from .lstm_spec import LSTMSpec

PAPER_CONFIGS = ((64, 512), (20, 1500), (64, 1024))  # (batch, hidden) of the papers' LSTMs
KEEP = 0.5


def bench_lstm_specs(configs: Sequence[tuple[int, int]] = PAPER_CONFIGS, seq_len: int = 35,
                     dtype: str = "bfloat16") -> list[LSTMSpec]:
    """The LSTMs the benchmark runs (compile these into the bundle it is given)."""
    return [
        LSTMSpec(input_size=H, hidden_size=H, batch=B, seq_len=seq_len, dtype=dtype,
                 structured_dropout={"p_input": 1 - KEEP, "p_recurrent": 1 - KEEP}, name=f"b{B}_h{H}")
        for B, H in configs
    ]


NO_GPU = "skipped: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed"


def write_json(path, result: dict) -> None:
    """``result`` as indented JSON to ``path`` (nothing when ``path`` is None): the GPU benchmark
    scripts' ``--json``."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def skipped_without_gpu(result: dict, json_path) -> bool:
    """True when there is no CUDA GPU, after printing why and recording it as ``skipped`` in
    ``result`` (written to ``json_path``): the GPU benchmark scripts then exit 0."""
    import torch

    if torch.cuda.is_available():
        return False
    print(NO_GPU)
    result["skipped"] = NO_GPU
    write_json(json_path, result)
    return True


def _time(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, with CUDA events (after warm-up)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _kept(T: int, n: int, k: int, device):
    import torch

    return torch.rand(T, n, device=device).argsort(dim=1)[:, :k].sort(dim=1).values


def gemm_rows(backend, B: int, H: int, T: int, dtype, reps: int) -> list[dict]:
    import torch

    from rnn_sparsify.kernels import REFERENCE

    dev = backend.bundle.device
    k = int(H * KEEP)
    x = torch.randn(T, B, H, device=dev, dtype=dtype)
    w = torch.randn(4 * H, H, device=dev, dtype=dtype)
    g = torch.randn(T, B, 4 * H, device=dev, dtype=dtype)
    idx = _kept(T, H, k, dev)
    dw = torch.zeros(4 * H, H, device=dev, dtype=dtype)
    cases = [
        ("fwd_input (T*B x 4H x H)", lambda: backend.fwd_input(x, w, idx, 2.0),
         lambda: torch.matmul(x.view(T * B, H), w.t()), lambda: REFERENCE.fwd_input(x, w, idx, 2.0)),
        ("bwd_data dx (T*B x H x 4H)", lambda: backend.bwd_data(g, None, w, idx, 2.0),
         lambda: torch.matmul(g.view(T * B, 4 * H), w), lambda: REFERENCE.bwd_data(g, None, w, idx, 2.0)),
        ("wgrad (4H x H x T*B)", lambda: backend.wgrad(g, None, x, idx, dw, 2.0),
         lambda: dw.addmm_(g.view(T * B, 4 * H).t(), x.view(T * B, H)),
         lambda: REFERENCE.wgrad(g, None, x, idx, dw, 2.0)),
        ("fwd_recurrent, one step (B x 4H x H)", lambda: backend.fwd_recurrent(x[0], w, idx[0], 2.0),
         lambda: x[0] @ w.t(), lambda: REFERENCE.fwd_recurrent(x[0], w, idx[0], 2.0)),
    ]
    from rnn_sparsify.kernels.cuda_backend import masked_dense_wgrad

    # the wgrad the training path takes by default (cuda_backend.WGRAD_STRATEGIES), next to the kernel
    cases.insert(3, ("wgrad masked dense GEMM (4H x H x T*B)", lambda: masked_dense_wgrad(g, None, x, idx, dw, 2.0),
                     cases[2][2], cases[2][3]))
    rows = []
    saved, backend.wgrad_strategy = backend.wgrad_strategy, "kernel"  # time the generated kernel itself
    try:
        for name, kern, dense, gather in cases:
            method = name.split()[0]
            before = backend.paths[method]["kernel"]
            tk = _time(kern, reps)
            on_kernel = backend.paths[method]["kernel"] > before
            td, tg = _time(dense, reps), _time(gather, reps)
            path = "masked dense" if "masked dense" in name else ("kernel" if on_kernel else "reference")
            rows.append({"config": f"B={B} H={H} T={T}", "gemm": name, "kernel_ms": tk, "dense_ms": td,
                         "gather_ms": tg, "speedup": td / tk, "path": path})
    finally:
        backend.wgrad_strategy = saved
    return rows


def step_row(B: int, H: int, T: int, dtype, reps: int) -> dict:
    import torch

    from rnn_sparsify import SparseLSTM, StructuredDropout

    dev = torch.device("cuda")
    sparse = SparseLSTM(H, H, structured_dropout=StructuredDropout(1 - KEEP, 1 - KEEP)).to(dev, dtype).train()
    dense = torch.nn.LSTM(H, H).to(dev, dtype).train()
    x = torch.randn(T, B, H, device=dev, dtype=dtype)

    def run_sparse():
        y, _ = sparse(x)
        y.float().square().mean().backward()

    def run_dense():
        y, _ = dense(torch.nn.functional.dropout(x, 1 - KEEP))
        y.float().square().mean().backward()

    ts, td = _time(run_sparse, reps), _time(run_dense, reps)
    return {"config": f"B={B} H={H} T={T}", "sparse_ms": ts, "cudnn_ms": td,
            "backend": getattr(sparse, "last_backend", "?")}


def run(bundle: str, out: str | None = "docs/benchmarks.md", configs: Sequence[str] | None = None,
        seq_len: int = 35, reps: int = 50, dtype: str = "bfloat16") -> str:
    """Run the benchmark on the current GPU with ``bundle``; write/return the markdown report."""
    import torch

    if not torch.cuda.is_available():
        raise CodegenError("`rnn-sparsify bench` needs a CUDA GPU (torch.cuda.is_available() is False)")
    from rnn_sparsify.kernels import cuda_backend

    cuda_backend.use_bundle(bundle)
    dev = torch.device("cuda", torch.cuda.current_device())
    backend = cuda_backend.backend_for(dev)
    if backend is None:
        raise BundleError(f"bundle {bundle} cannot be used here: {cuda_backend.load_errors()}")
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    pairs = [tuple(int(v) for v in c.lower().split("x")) for c in configs] if configs else PAPER_CONFIGS
    gemms, steps = [], []
    for B, H in pairs:
        gemms += gemm_rows(backend, B, H, seq_len, tdtype, reps)
        steps.append(step_row(B, H, seq_len, tdtype, max(5, reps // 5)))
    lines = [
        "# Benchmarks", "",
        f"Device: {torch.cuda.get_device_name(dev)} ({cuda_backend.backend_for(dev).bundle.arch}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {dtype}, {int(KEEP * 100)}% of units kept, "
        "median of CUDA-event timings.", "",
        f"Command: `{' '.join(['rnn-sparsify', 'bench', *sys.argv[2:]]) if sys.argv and 'bench' in sys.argv else 'rnn_sparsify.codegen.bench.run(...)'}`",
        "", "## Indexed GEMMs vs dense cuBLAS (full size) and torch gather + matmul", "",
        "| config | GEMM | path | kernel ms | dense ms | gather+mm ms | speedup vs dense | % of ideal 2x |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in gemms:
        lines.append(f"| {r['config']} | {r['gemm']} | {r['path']} | {r['kernel_ms']:.4f} | {r['dense_ms']:.4f} | "
                     f"{r['gather_ms']:.4f} | {r['speedup']:.2f} | {100 * r['speedup'] / 2:.0f}% |")
    lines += ["", "## One training step (forward + backward)", "",
              "| config | SparseLSTM ms (backend) | nn.LSTM cuDNN ms | ratio |", "|---|---:|---:|---:|"]
    for r in steps:
        lines.append(f"| {r['config']} | {r['sparse_ms']:.3f} ({r['backend']}) | {r['cudnn_ms']:.3f} | "
                     f"{r['cudnn_ms'] / r['sparse_ms']:.2f} |")
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
    return text
