"""``rnn-sparsify compile`` and ``rnn-sparsify bench``: thin argparse front ends.

``rnn_sparsify.cli`` calls :func:`register` with its subparsers. Each subcommand delegates to
a library function (:func:`rnn_sparsify.codegen.aot.compile_lstms` /
:func:`~rnn_sparsify.codegen.aot.compile_model`, :func:`rnn_sparsify.codegen.bench.run`);
typed errors become exit codes (``CodegenError.exit_code``) with the message as the hint.
Importing this module is cheap: TVM is imported only when compiling.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import CodegenError


def _gate(text: str | None):
    """``coarse:P=4,R=8,S=4`` | ``meprop:keep=0.5`` | ``fine:My=8,Mx=4,K=4`` -> config dict."""
    if not text:
        return None
    mode, _, rest = text.partition(":")
    d = {"kind": "gate_gradient_sparsity", "mode": mode}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        d[k.strip()] = float(v) if k.strip() == "keep" else int(v)
    return d


def _load_model(target: str):
    """``package.module:factory`` -> ``factory()`` (a torch module)."""
    mod, _, attr = target.partition(":")
    if not attr:
        raise CodegenError(f"--model must be 'module:callable', got {target!r}")
    obj = getattr(importlib.import_module(mod), attr)
    return obj() if callable(obj) and not hasattr(obj, "named_modules") else obj


def cmd_compile(args: argparse.Namespace) -> int:
    from .aot import compile_lstms, compile_model
    from .lstm_spec import LSTMSpec

    kw = dict(cache_dir=args.cache_dir, progress=not args.quiet)
    if args.model:
        manifest = compile_model(_load_model(args.model), args.batch, args.seq_len, args.arch, args.out,
                                 dtype=args.dtype, **kw)
    else:
        if args.input_size is None or args.hidden_size is None:
            raise CodegenError("give --model, or --input-size and --hidden-size (an LSTM spec)")
        sd = None
        if args.p_input or args.p_recurrent:
            sd = {"kind": "structured_dropout", "p_input": args.p_input, "p_recurrent": args.p_recurrent}
        spec = LSTMSpec(
            input_size=args.input_size, hidden_size=args.hidden_size, batch=args.batch,
            seq_len=args.seq_len, num_layers=args.num_layers, bidirectional=args.bidirectional,
            dtype=args.dtype or "bfloat16", structured_dropout=sd, gate_sparsity=_gate(args.gate),
        )
        manifest = compile_lstms([spec], args.arch, args.out, **kw)
    from .aot import compile_specs

    stats = getattr(compile_specs, "last_stats", {})
    print(f"bundle {args.out}: {len(manifest.kernels)} kernels for {', '.join(manifest.archs)} "
          f"({stats.get('cache_hits', 0)} from cache)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    run(bundle=args.bundle, out=args.out, configs=args.config, seq_len=args.seq_len,
        reps=args.reps, dtype=args.dtype)
    return 0


def register(subparsers) -> None:
    """Add the ``compile`` and ``bench`` subcommands to ``rnn_sparsify.cli``'s subparsers."""
    p = subparsers.add_parser(
        "compile",
        help="generate and compile the sparse GEMM kernels of a model or LSTM spec into a bundle",
        description="Build every indexed GEMM kernel an LSTM needs (TVM + nvcc, no GPU needed) into a "
        "bundle folder: CUDA source, cubin, PTX and manifest.json. Needs apache-tvm and nvcc.",
    )
    p.add_argument("-o", "--out", required=True, help="bundle folder to write")
    p.add_argument("--arch", action="append", required=True, help="target arch, e.g. sm_90 (repeatable)")
    p.add_argument("--model", help="module:callable returning a model that contains (Sparse)LSTMs")
    p.add_argument("--input-size", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--p-input", type=float, default=0.0, help="structured dropout of the input units")
    p.add_argument("--p-recurrent", type=float, default=0.0, help="structured dropout of h_{t-1}")
    p.add_argument("--gate", help="gate-gradient sparsity, e.g. coarse:P=4,R=8,S=4 or meprop:keep=0.5")
    p.add_argument("--cache-dir", default=None, help="compile cache (default ~/.cache/rnn_sparsify/kernels)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compile)

    b = subparsers.add_parser(
        "bench",
        help="time the generated kernels against cuBLAS, torch gather+matmul and cuDNN (needs a GPU)",
    )
    b.add_argument("--bundle", required=True, help="kernel bundle (see `compile`)")
    b.add_argument("--out", default="docs/benchmarks.md", help="markdown file to write")
    b.add_argument("--config", action="append", default=None,
                   help="BATCHxHIDDEN, e.g. 64x512 (repeatable; default: the papers' configs)")
    b.add_argument("--seq-len", type=int, default=35)
    b.add_argument("--reps", type=int, default=50)
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    b.set_defaults(func=cmd_bench)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; typed errors become their exit code with the message on stderr."""
    try:
        return args.func(args)
    except CodegenError as e:
        print(f"rnn-sparsify {args.command if hasattr(args, 'command') else ''}: error: {e}", file=sys.stderr)
        return e.exit_code


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m rnn_sparsify.codegen.cli``)."""
    parser = argparse.ArgumentParser(prog="rnn-sparsify")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
