"""``rnn-sparsify compile`` and ``rnn-sparsify bench``: thin argparse front ends.

``rnn_sparsify.cli`` calls :func:`register` with its subparsers. Each subcommand delegates to
a library function (:func:`rnn_sparsify.codegen.aot.compile_lstms`,
:func:`rnn_sparsify.codegen.model_plan.plan_model`, :func:`rnn_sparsify.codegen.bench.run`);
every option is checked by its argparse type before any work (``rnn_sparsify.target``), and
typed errors become exit codes (``CodegenError.exit_code``, ``CLIError.exit_code``).
Importing this module is cheap: TVM is imported only when compiling.
"""
from __future__ import annotations

import argparse
import os
import sys

from rnn_sparsify.target import (
    GATE_HELP, EnvironmentMissing, NoLSTMError, NothingToBuildError, arch, gate_spec, load_model,
    model_target, output_problem, positive_int, probability,
)

from .errors import CodegenError, UnsupportedGemm

MODEL_HELP = ("path/to/file.py:factory, package.module:factory (from the current folder) or a torch.save'd "
              "model (.pt); the factory returns a module, (module, example_inputs) or (module, example_inputs, "
              "example_kwargs)")


def _gate(text: str | None):
    """``coarse:P=4,R=8,S=4`` | ``meprop:keep=0.5`` | ``fine:My=8,Mx=4,K=4`` -> config dict."""
    if not text:
        return None
    return gate_spec(text)


def _flag_configs(args: argparse.Namespace):
    from rnn_sparsify.config import StructuredDropout, config_from_dict

    sd = StructuredDropout(args.p_input, args.p_recurrent) if (args.p_input or args.p_recurrent) else None
    return sd, (config_from_dict(args.gate) if args.gate else None)


def build_from_model(target: str, batch: int, seq_len: int, archs, out, *, dtype=None, structured_dropout=None,
                     gate_sparsity=None, persistent_train=False, sms=None, **kw):
    """``compile --model``: load the model, plan its kernels, build them. Returns ``(plan, manifest)``.
    ``persistent_train``: also the persistent training loops of each planned LSTM
    (:func:`persistent_train_requests_from_plan`).

    Raises ``NoLSTMError`` (nothing LSTM-like) and ``NothingToBuildError`` (no LSTM needs a
    sparse kernel, each LSTM's reason in the message).
    """
    from rnn_sparsify.sparsify import NoLSTMFoundError

    from .aot import compile_lstms
    from .model_plan import plan_model

    model = load_model(target).module
    try:
        plan = plan_model(model, batch, seq_len, dtype, structured_dropout=structured_dropout,
                          gate_sparsity=gate_sparsity)
    except NoLSTMFoundError as e:
        raise NoLSTMError(str(e)) from e
    if not plan.lstms:
        why = "; ".join(f"{e.name}: {e.reason}" for e in plan.entries)
        err = NothingToBuildError(f"nothing to build: no LSTM of {target} needs a sparse kernel ({why})")
        if plan.sparsified_from_flags:
            err.hint = "each LSTM above is skipped or has no sparse GEMM; `rnn-sparsify inspect` shows why in detail"
        raise err
    if persistent_train:
        kw["persistent_train"] = with_sms(persistent_train_requests_from_plan(plan), sms)
    return plan, compile_lstms(plan.lstms, archs, out, **kw)


def cpu_layer_specs(lspec, isa: str) -> list:
    """The CPU layer-kernel specs one LSTM spec needs (every layer and direction)."""
    from rnn_sparsify.config import config_from_dict, kept_count
    from rnn_sparsify.kernels.cpu_backend import TvmCpuLayerBackend

    from rnn_sparsify.kernels.layer import coarse_params

    be = TvmCpuLayerBackend(isa)
    sd = config_from_dict(lspec.structured_dropout) if lspec.structured_dropout else None
    coarse = coarse_params(config_from_dict(lspec.gate_sparsity) if lspec.gate_sparsity else None)
    D = 2 if lspec.bidirectional else 1
    H = lspec.hidden_size
    out = []
    for layer in range(lspec.num_layers):
        n_in = lspec.input_size if layer == 0 else H * D
        k_in = kept_count(n_in, sd.p_input) if sd else n_in
        k_rec = kept_count(H, sd.p_recurrent) if sd else H
        spec = be.spec_for(n_in, H, lspec.batch, k_in, k_rec, coarse)
        if spec not in out:
            out.append(spec)
    return out


def cpu_eval_specs(lspec, isa: str) -> list:
    """The weight-sparse eval kernel specs one LSTM spec needs (one per layer input width)."""
    from .cpu_sparse import CpuSparseEvalSpec, pad_batch

    D = 2 if lspec.bidirectional else 1
    H = lspec.hidden_size
    widths = dict.fromkeys([lspec.input_size] + [H * D] * (lspec.num_layers - 1))
    return [CpuSparseEvalSpec(input_size=n, hidden_size=H, batch=pad_batch(lspec.batch, isa), isa=isa)
            for n in widths]


def eval_lstm_specs(model, batch: int) -> list:
    """One float32 LSTMSpec per ``nn.LSTM`` of ``model`` the weight-sparse eval kernels can
    run (no ``proj_size``), for ``compile --eval-kernels --model``."""
    from torch import nn

    from .lstm_spec import LSTMSpec

    return [LSTMSpec(input_size=m.input_size, hidden_size=m.hidden_size, batch=batch, seq_len=1,
                     num_layers=m.num_layers, bidirectional=m.bidirectional, dtype="float32", name=name)
            for name, m in model.named_modules() if isinstance(m, nn.LSTM) and not m.proj_size]


def compile_cpu(lspecs, out, *, isa: str | None = None, quiet: bool = False, eval_lspecs=()) -> list:
    """``compile --target cpu``: build the CPU kernel libraries of ``lspecs`` (their sparse
    training kernels) and the weight-sparse eval kernels of ``eval_lspecs`` into ``out``'s
    ``cpu/`` tree (the cache layout), plus the kernel runtime. Returns the folders."""
    from pathlib import Path

    from rnn_sparsify.kernels import cpu_runtime

    isa = isa or cpu_runtime.host_isa()
    root = Path(out)
    specs = [s for ls in lspecs for s in cpu_layer_specs(ls, isa)]
    specs += [s for ls in eval_lspecs for s in cpu_eval_specs(ls, isa)]
    folders = []
    for spec in dict.fromkeys(specs):
        folder = cpu_runtime.entry_dir(root, spec)
        if (folder / "layer.so").exists() and cpu_runtime._valid_entry(folder):
            folders.append(folder)
            continue
        folders.append(cpu_runtime.build_entry(spec, root, quiet=quiet))
    cpu_runtime.build_runtime(cpu_runtime._runtime_path(root))
    return folders


def density(text: str) -> float:
    """argparse type: a density in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a density in (0, 1]") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: a density in (0, 1]")
    return v


def persistent_requests(args: argparse.Namespace, model=None) -> list:
    """``compile --persistent-eval``: one request per LSTM (the spec, or every ``nn.LSTM`` of
    ``model`` without ``proj_size``). The non-zero bound per gate row of ``W_hh``: ``--nnz-max``,
    else from ``--density`` (:func:`~.persistent_sparse.nnz_bound`), else the densest row of
    the model's (already pruned) ``W_hh``."""
    from torch import nn

    from .persistent_sparse import PersistentEvalRequest, nnz_bound

    def bound(H, weights=()):
        if args.nnz_max:
            return min(args.nnz_max, H)
        if args.density:
            return nnz_bound(H, args.density)
        nz = [int((w != 0).sum(1).max()) for w in weights]
        if weights and max(nz) < H:
            return max(nz)
        raise NothingToBuildError("--persistent-eval needs the non-zero bound of W_hh: give --nnz-max N or "
                                  "--density D (or a model whose recurrent weights are already pruned)")

    if model is None:
        H = args.hidden_size
        return [PersistentEvalRequest(H, args.batch, bound(H), args.dtype or "bfloat16")]
    out = []
    for _name, m in model.named_modules():
        if isinstance(m, nn.LSTM) and not m.proj_size:
            ws = [getattr(m, n) for n in m._flat_weights_names if n.startswith("weight_hh")]
            dtype = args.dtype or {"float16": "float16", "bfloat16": "bfloat16"}.get(str(ws[0].dtype)[6:], "float32")
            out.append(PersistentEvalRequest(m.hidden_size, args.batch, bound(m.hidden_size, ws), dtype))
    if not out:
        raise NothingToBuildError(f"--persistent-eval: no nn.LSTM without proj_size in {args.model}")
    return list(dict.fromkeys(out))


def persistent_train_requests(args: argparse.Namespace, sd, gs) -> list:
    """``compile --persistent-train`` (an LSTM spec): the persistent training loops of its hidden
    size, with the kept count of ``--p-recurrent`` and the coarse selection of ``--gate``."""
    from .persistent_train import train_request

    req = train_request(args.hidden_size, args.batch, sd, gs, args.dtype or "bfloat16")
    if req is None:
        raise UnsupportedGemm(f"--persistent-train fuses coarse gate-gradient selection only, not {gs.mode} "
                              "(fine/meprop run on the per-step kernels): drop --persistent-train or use "
                              "--gate coarse:P,R,S")
    return [req]


def with_sms(requests: list, sms) -> list:
    """Each persistent-kernel request once per ``--sms`` value (its grid; none given: the
    arch's reference part)."""
    from dataclasses import replace

    return [replace(r, sms=s) for r in requests for s in (sms or [None])]


def persistent_train_requests_from_plan(plan) -> list:
    """``compile --model --persistent-train``: one request per distinct (hidden size, batch,
    kept units, dtype, coarse selection) of the model's planned LSTMs -- every layer and
    direction of an LSTM runs the same two kernels. An LSTM with fine or meProp gate sparsity
    gets none (those run on the per-step kernels; a line says so); if no LSTM can use them,
    ``UnsupportedGemm`` says why for each."""
    from rnn_sparsify.config import config_from_dict

    from .persistent_train import train_request

    out, skipped = [], []
    for ls in plan.lstms:
        sd = config_from_dict(ls.structured_dropout) if ls.structured_dropout else None
        gs = config_from_dict(ls.gate_sparsity) if ls.gate_sparsity else None
        req = train_request(ls.hidden_size, ls.batch, sd, gs, ls.dtype)
        if req is None:
            skipped.append(f"{ls.name or 'LSTM'} (hidden {ls.hidden_size}): {gs.mode} gate sparsity is not fused "
                           "in the persistent loops (coarse only)")
            continue
        out.append(req)
    if not out:
        raise UnsupportedGemm("--persistent-train: no LSTM of the model can use the persistent training loops: "
                              + "; ".join(skipped))
    for line in skipped:
        print(f"--persistent-train: skipped {line}")
    return list(dict.fromkeys(out))


def print_persistent_train(manifest) -> None:
    """One line per persistent training-loop kernel of ``manifest``."""
    from .persistent_train import KINDS

    for e in manifest.kernels:
        if e.spec.get("kind") not in KINDS:
            continue
        s = e.spec
        sel = ", coarse {}/{}/{}".format(*s["coarse"]) if s.get("coarse") else ""
        print(f"persistent training {s['part']} kernel {e.arch}: hidden {s['hidden_size']}, batch {s['batch']}, "
              f"{s['keep']} kept units/step{sel}, {s['dtype']}: {e.grid[0]} CTAs x {e.block[0]} threads, "
              f"{e.dynamic_smem_bytes} B shared memory, {e.registers} registers, {e.launch} launch")


def print_persistent(manifest) -> None:
    """One line per sparse persistent eval kernel of ``manifest``: what was built."""
    from .persistent_sparse import KIND

    for e in manifest.kernels:
        if e.spec.get("kind") != KIND:
            continue
        s = e.spec
        print(f"persistent eval kernel {e.arch}: hidden {s['hidden_size']}, batch {s['batch']}, <= {s['nnz']} "
              f"non-zeros per gate row, {s['dtype']}: {e.grid[0]} CTAs x {e.block[0]} threads, "
              f"{e.dynamic_smem_bytes} B shared memory, {e.registers} registers, {s['reg_nnz']} non-zeros per thread "
              f"in registers, {e.launch} launch")


def _print_dtype_note(manifest, requested, param_dtypes) -> None:
    """The dtype of the GEMM kernels built and what autocast training runs (``dtype_note``)."""
    from .gemm_gather import GENERATORS
    from .model_plan import dtype_note

    line = dtype_note([e.spec["dtype"] for e in manifest.kernels if e.spec.get("kind") in GENERATORS],
                      requested, param_dtypes)
    if line:
        print(line)


def cmd_compile(args: argparse.Namespace) -> int:
    from .aot import compile_lstms, compile_specs
    from .lstm_spec import LSTMSpec

    kw = dict(cache_dir=args.cache_dir, progress=not args.quiet)
    sd, gs = _flag_configs(args)
    if args.target == "cpu":
        if args.model:
            from .model_plan import plan_model

            model = load_model(args.model).module
            plan = plan_model(model, args.batch, args.seq_len, "float32",
                              structured_dropout=sd, gate_sparsity=gs)
            lspecs = plan.lstms
            print(plan.table())
            eval_lspecs = eval_lstm_specs(model, args.batch) if args.eval_kernels else []
        else:
            lspecs = [LSTMSpec(
                input_size=args.input_size, hidden_size=args.hidden_size, batch=args.batch,
                seq_len=args.seq_len, num_layers=args.num_layers, bidirectional=args.bidirectional,
                dtype="float32", structured_dropout=sd.to_dict() if sd else None,
                gate_sparsity=gs.to_dict() if gs else None,
            )]
            eval_lspecs = lspecs if args.eval_kernels else []
        lspecs = [ls for ls in lspecs if ls.structured_dropout or ls.gate_sparsity]
        if not lspecs and not eval_lspecs:
            raise NothingToBuildError("nothing to build: no LSTM has a sparsity config (dense LSTMs run "
                                      "on nn.LSTM); pass --p-input/--p-recurrent or --gate, or "
                                      "--eval-kernels for weight-sparse eval")
        folders = compile_cpu(lspecs, args.out, quiet=args.quiet, eval_lspecs=eval_lspecs)
        if eval_lspecs:
            print(f"weight-sparse eval kernels for {len(eval_lspecs)} nn.LSTM module(s) at batch {args.batch}")
        print(f"bundle {args.out}: {len(folders)} CPU kernel libraries (cpu/), load with "
              f"RNN_SPARSIFY_KERNELS={args.out} or rnn_sparsify.kernels.cpu_runtime.use_cpu_bundle()")
        return 0
    if args.persistent_eval:
        kw["persistent"] = with_sms(persistent_requests(args, load_model(args.model).module if args.model else None),
                                    args.sms)
    if args.persistent_train and not args.model:
        kw["persistent_train"] = with_sms(persistent_train_requests(args, sd, gs), args.sms)
    plan = None
    if args.model:
        try:
            plan, manifest = build_from_model(args.model, args.batch, args.seq_len, args.arch, args.out,
                                              dtype=args.dtype, structured_dropout=sd, gate_sparsity=gs,
                                              persistent_train=args.persistent_train, sms=args.sms, **kw)
            print(plan.table())
        except NothingToBuildError:
            if not args.persistent_eval:
                raise
            from .aot import compile_persistent

            manifest = compile_persistent(kw.pop("persistent"), args.arch, args.out, **kw)
    elif sd is None and gs is None and (args.persistent_eval or args.persistent_train):
        manifest = compile_specs((), args.arch, args.out, **kw)
    else:
        if sd is None and gs is None:
            raise NothingToBuildError("nothing to build: the LSTM spec has no sparsity (every GEMM is dense, "
                                      "cuBLAS runs it); --persistent-eval builds the weight-sparse eval kernels")
        spec = LSTMSpec(
            input_size=args.input_size, hidden_size=args.hidden_size, batch=args.batch,
            seq_len=args.seq_len, num_layers=args.num_layers, bidirectional=args.bidirectional,
            dtype=args.dtype or "bfloat16", structured_dropout=sd.to_dict() if sd else None,
            gate_sparsity=gs.to_dict() if gs else None,
        )
        manifest = compile_lstms([spec], args.arch, args.out, **kw)
    stats = getattr(compile_specs, "last_stats", {})
    print_persistent(manifest)
    print_persistent_train(manifest)
    _print_dtype_note(manifest, args.dtype, plan.param_dtypes if args.model and plan is not None else [])
    print(f"bundle {args.out}: {len(manifest.kernels)} kernels for {', '.join(manifest.archs)} "
          f"({stats.get('cache_hits', 0)} from cache)")
    return 0


def bench_pairs(args: argparse.Namespace) -> list[tuple[int, int]] | None:
    """``--config BxH`` pairs, or ``(batch, hidden)`` of each LSTM of ``--model``."""
    if args.model:
        from torch import nn

        model = load_model(args.model).module
        pairs = sorted({(args.batch, m.hidden_size) for m in model.modules() if isinstance(m, (nn.LSTM, nn.LSTMCell))})
        if not pairs:
            raise NoLSTMError(f"no nn.LSTM or nn.LSTMCell in {args.model} to benchmark")
        return pairs
    return [tuple(c) for c in args.config] if args.config else None


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    if not os.path.isfile(os.path.join(args.bundle, "manifest.json")):
        from .errors import BundleError

        raise BundleError(f"{args.bundle} is not a kernel bundle (no manifest.json); build one with "
                          f"`rnn-sparsify compile -o {args.bundle} ...`")
    pairs = bench_pairs(args)
    import torch

    if not torch.cuda.is_available():
        raise EnvironmentMissing("`rnn-sparsify bench` needs a CUDA GPU (torch.cuda.is_available() is False)")
    run(bundle=args.bundle, out=args.out, configs=[f"{b}x{h}" for b, h in pairs] if pairs else None,
        seq_len=args.seq_len, reps=args.reps, dtype=args.dtype)
    return 0


def _bxh(text: str) -> tuple[int, int]:
    b, sep, h = text.lower().partition("x")
    try:
        pair = (int(b), int(h))
    except ValueError:
        pair = None
    if not sep or pair is None or min(pair) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxHIDDEN with both > 0, e.g. 64x512")
    return pair


def register(subparsers, parents=()) -> None:
    """Add the ``compile`` and ``bench`` subcommands to ``rnn_sparsify.cli``'s subparsers."""
    p = subparsers.add_parser(
        "compile", parents=list(parents),
        help="generate and compile the sparse GEMM kernels of a model or LSTM spec into a bundle",
        description="Build every indexed GEMM kernel an LSTM needs (TVM + nvcc, no GPU needed) into a "
        "bundle folder: CUDA source, cubin, PTX and manifest.json. Needs apache-tvm and nvcc. With --model, "
        "the sparsity comes from the flags (the model is sparsified with them) or, without flags, from the "
        "configs already on the model (one returned by sparsify); every LSTM is listed, built or not and why.",
    )
    p.add_argument("-o", "--out", required=True, help="bundle folder to write (created with its parents)")
    p.add_argument("--target", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (cubins for --arch) or cpu (TVM LLVM kernels for this host's ISA)")
    p.add_argument("--arch", action="append", default=None, type=arch,
                   help="target arch, sm_80 or newer, e.g. sm_90 (repeatable; with --target cuda)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=model_target, help=MODEL_HELP)
    src.add_argument("--input-size", type=positive_int, help="an LSTM spec instead of a model (with --hidden-size)")
    p.add_argument("--hidden-size", type=positive_int)
    p.add_argument("--num-layers", type=positive_int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--batch", type=positive_int, required=True, help="batch size the kernels are built for")
    p.add_argument("--seq-len", type=positive_int, required=True, help="sequence length (time steps per call)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: the model's parameter dtype (bfloat16 for an LSTM spec); bfloat16/float16 "
                   "run on tensor cores, float32 on FMA; kernels are picked by the tensors' dtype, so "
                   "autocast training of a float32 model does not use bfloat16 ones")
    p.add_argument("--p-input", type=probability, default=0.0, help="structured dropout of the input units, in [0, 1)")
    p.add_argument("--p-recurrent", type=probability, default=0.0, help="structured dropout of h_{t-1}, in [0, 1)")
    p.add_argument("--gate", type=gate_spec, help=f"gate-gradient sparsity: {GATE_HELP}")
    p.add_argument("--eval-kernels", action="store_true",
                   help="--target cpu: also the weight-sparse eval() kernels (pruned LSTMs; any sparsity)")
    p.add_argument("--persistent-eval", action="store_true",
                   help="--target cuda: also the sparse persistent eval() kernels of weight-sparse LSTMs (one "
                   "cooperative launch per layer runs all steps; needs --nnz-max or --density, or a pruned --model)")
    p.add_argument("--nnz-max", type=positive_int, default=None,
                   help="--persistent-eval: bound on non-zeros per gate row of W_hh (the format's width)")
    p.add_argument("--density", type=density, default=None,
                   help="--persistent-eval: W_hh density in (0, 1]; the bound is the mean row count + 5 sigma")
    p.add_argument("--persistent-train", action="store_true",
                   help="--target cuda: also the persistent training loops of the LSTM spec, or of every "
                   "LSTM of --model (forward with the structured RH dropout, backward-data with coarse "
                   "gate selection fused; one cooperative launch each; the persistent_train layer rule "
                   "runs them for a CUDA training call of that shape)")
    p.add_argument("--sms", type=int, action="append", default=None, metavar="N",
                   help="--persistent-eval/--persistent-train: build the persistent kernels' grid for a GPU with N "
                   "SMs (one CTA per SM; repeat for several parts, e.g. --sms 114 --sms 132). Default: the arch's "
                   "largest part (sm_80: 108, A100; sm_90: 132, H100 SXM/H200); a smaller part of the same arch "
                   "(A30: 56, H100 PCIe: 114) cannot run that grid. At run time the largest grid co-resident "
                   "on the GPU is used")
    p.add_argument("--cache-dir", default=None, help="compile cache (default ~/.cache/rnn_sparsify/kernels)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compile, check=_check_compile, subparser=p)

    b = subparsers.add_parser(
        "bench", parents=list(parents),
        help="time the generated kernels against cuBLAS, torch gather+matmul and cuDNN (needs a CUDA GPU)",
        description="Time a kernel bundle on this GPU (needs a CUDA GPU and the gpu extra: pip install -e "
        "'.[gpu]'; no TVM). The bundle must hold kernels for the configurations timed: build it with "
        "`rnn-sparsify compile` for the same batch, hidden size, --seq-len and --dtype, p_input=p_recurrent=0.5.",
    )
    b.add_argument("--bundle", required=True, help="kernel bundle folder (see `compile`)")
    b.add_argument("--out", default="docs/benchmarks.md", help="markdown file to write (folders created)")
    b.add_argument("--model", type=model_target, help=MODEL_HELP + "; times each LSTM's hidden size at --batch")
    b.add_argument("--batch", type=positive_int, default=64, help="batch size with --model (default 64)")
    b.add_argument("--config", action="append", default=None, type=_bxh,
                   help="BATCHxHIDDEN, e.g. 64x512 (repeatable; default: the papers' configs)")
    b.add_argument("--seq-len", type=positive_int, default=35)
    b.add_argument("--reps", type=positive_int, default=50)
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    b.set_defaults(func=cmd_bench, check=_check_bench, subparser=b)


def _check_compile(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option checks (before any work); ``parser.error`` exits 2."""
    if args.input_size is not None and args.hidden_size is None:
        parser.error("--input-size needs --hidden-size")
    if args.target == "cuda" and not args.arch:
        parser.error("the following arguments are required with --target cuda: --arch")
    if args.persistent_eval and args.target != "cuda":
        parser.error("--persistent-eval builds GPU kernels: use it with --target cuda")
    if args.persistent_train and args.target != "cuda":
        parser.error("--persistent-train builds GPU kernels: use it with --target cuda")
    if args.sms:
        if not (args.persistent_eval or args.persistent_train):
            parser.error("--sms sets the grid of the persistent kernels; add --persistent-eval or --persistent-train")
        from .persistent_sparse import ARCH_LIMITS

        for a in args.arch or ():
            for n in args.sms:
                top = ARCH_LIMITS.get(a, {}).get("sms")
                if n < 1 or (top is not None and n > top):
                    parser.error(f"--sms {n}: {a} parts have 1..{top} SMs (its largest: {top})")
    if (args.nnz_max or args.density) and not args.persistent_eval:
        parser.error("--nnz-max/--density describe the --persistent-eval kernels; add --persistent-eval")
    if args.model and (args.hidden_size is not None or args.num_layers != 1 or args.bidirectional):
        parser.error("--hidden-size/--num-layers/--bidirectional describe an LSTM spec; with --model the sizes "
                     "come from the model")
    why = output_problem(args.out, folder=True)
    if why:
        parser.error(f"argument -o/--out: {why}")


def _check_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    why = output_problem(args.out, folder=False)
    if why:
        parser.error(f"argument --out: {why}")
    if args.model and args.config:
        parser.error("--model and --config both choose the configurations; give one")


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; typed errors become their exit code with the message on stderr."""
    try:
        return args.func(args)
    except CodegenError as e:
        print(f"rnn-sparsify {getattr(args, 'command', '')}: error: {e}", file=sys.stderr)
        return e.exit_code


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m rnn_sparsify.codegen.cli``): the full CLI."""
    from rnn_sparsify.cli import main as full_main

    return full_main(argv)


if __name__ == "__main__":
    sys.exit(main())
