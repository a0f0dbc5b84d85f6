"""``rnn-sparsify``: command-line front end (thin; every action is a library call).

Commands: ``inspect`` (what sparsify would do, changes nothing), ``compile`` (build the
kernels a model or an LSTM spec needs), ``bench`` (time a bundle on a GPU), ``env`` (what this
installation can do). Every command names a model the same way (:func:`rnn_sparsify.target.load_model`):
``path/to/file.py:factory``, ``package.module:factory`` or a ``torch.save``'d ``model.pt``.
Python equivalents: :func:`load_model`, :func:`rnn_sparsify.inspect_model`,
:meth:`SparsifyReport.table`/``to_dict``, :func:`rnn_sparsify.passes.dot.to_dot`,
:func:`rnn_sparsify.codegen.model_plan.plan_model`, :func:`env_report`.

Every option is checked by its argparse type before any work. Errors are one line on stderr
and an exit code (:data:`rnn_sparsify.target.EXIT_CODES`): 0 ok; 1 internal error (a bug:
report it); 2 bad arguments or config; 3 model file/module/factory not found; 4 the model's
code raised or the factory returned something else; 5 no LSTM in the model; 6 the example
inputs do not run through the model; 7 nothing to build; 8 TVM/nvcc/GPU missing; 9 bad
kernel bundle. ``--verbose`` adds the traceback and the report's raw details.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .target import (
    EXIT_CODES, REPORT_HINT, CLIError, ConfigArgError, EnvironmentMissing, ExampleInputsError, FactoryError,
    ModelSpecError, OutputError, NoLSTMError, NothingToBuildError, config_json, load_model, model_target, output_problem,
    positive_int,
)

__all__ = ["main", "load_factory", "load_model", "CLIError", "ModelSpecError", "FactoryError", "ExampleInputsError",
           "ConfigArgError", "NoLSTMError", "NothingToBuildError", "EnvironmentMissing", "EXIT_CODES", "run_inspect",
           "env_report"]


def load_factory(spec: str):
    """``file.py:factory`` or ``module:factory`` -> ``(model, example_inputs or None)``
    (see :func:`rnn_sparsify.target.load_model`, which also returns the example kwargs)."""
    loaded = load_model(spec)
    return loaded.module, loaded.example_inputs


def run_inspect(spec: str, configs: Sequence = (), *, use_inputs: bool = True, fmt: str = "table",
                batch_size: Optional[int] = None, seq_len: Optional[int] = None, verbose: bool = False) -> str:
    """What ``rnn-sparsify inspect`` prints, as a string (raises the CLI's typed errors)."""
    from .sparsify import NoLSTMFoundError, inspect_model

    loaded = load_model(spec)
    model = loaded.module
    inputs, kwargs = (loaded.example_inputs, loaded.example_kwargs) if use_inputs else (None, None)
    try:
        report = inspect_model(model, *configs, example_inputs=inputs, example_kwargs=kwargs)
    except NoLSTMFoundError as e:
        raise NoLSTMError(str(e)) from e
    except (ValueError, TypeError) as e:
        if "example_inputs do not run" in str(e):
            raise ExampleInputsError(str(e)) from e
        if str(e).startswith("sparsify:"):  # the library's own checks of the configs
            raise ConfigArgError(str(e)) from e
        raise  # anything else is a bug: reported as an internal error
    if fmt == "dot":
        from rnn_sparsify.passes.dot import to_dot

        return to_dot(model)
    if fmt == "json":
        return json.dumps(report.to_dict(batch_size, seq_len), indent=2, default=str) + "\n"
    text = report.table(batch_size, seq_len) + "\n"
    if verbose and report.details:
        text += "\ndetails (raw messages):\n" + "".join(f"  {k}: {v}\n" for k, v in report.details.items())
    return text


def _write(path: Optional[str], text: str) -> None:
    if not path:
        sys.stdout.write(text)
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise OutputError(f"cannot write -o {path}: {e.strerror or e}") from e
    print(f"wrote {path}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    text = run_inspect(args.model, args.config or (), use_inputs=not args.no_inputs, fmt=args.format,
                       batch_size=args.batch_size, seq_len=args.seq_len, verbose=args.verbose)
    _write(args.output, text)
    return 0


# ---------------------------------------------------------------------------------------
# env
def cpu_vector_isa(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The SIMD extensions of this CPU that matter for GEMMs, from ``/proc/cpuinfo`` flags
    (x86: avx512*, amx*, avx2, fma, avx; Arm: sve, asimd/neon); [] when unknown."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(val.split())
            break
    order = ["amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx2",
             "fma", "avx", "sse4_2", "sve2", "sve", "asimd", "neon", "bf16", "i8mm"]
    found = [f for f in order if f in flags]
    return ["neon" if f == "asimd" else f for f in found]


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _folder_size(path) -> tuple[int, int]:
    files = total = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
                files += 1
            except OSError:
                pass
    return files, total


def cpu_layer_choice(mod, dtype) -> tuple[str, str]:
    """``(layer backend, why)`` for an LSTM's sparse training path on the CPU, as the rule list
    of :mod:`rnn_sparsify.kernels.layer` decides it (dry: nothing is built), with
    StructuredDropout(0.5, 0.5) when the module carries no config of its own."""
    from .config import StructuredDropout
    from .kernels.layer import explain_lstm

    configs = (getattr(mod, "structured_dropout", None), getattr(mod, "gate_sparsity", None))
    if configs == (None, None):
        configs = (StructuredDropout(0.5, 0.5), None)
    name, verdicts = explain_lstm(mod, batch=20, configs=configs)  # dtype: the module's own parameters
    why = "; ".join(f"{r}: {v}" for r, v in verdicts)
    return name, why


def backend_choice(device, dtype) -> tuple[str, str]:
    """``(backend name, why)`` for the sparse GEMMs of an LSTM on ``device``/``dtype``
    (:func:`rnn_sparsify.kernels.select_backend`)."""
    import torch

    from .codegen.errors import CodegenError
    from .kernels import select_backend

    try:
        name = select_backend(torch.device(device), dtype).name
    except CodegenError as e:  # e.g. RNN_SPARSIFY_KERNELS names a broken bundle
        return "reference", f"the kernel bundle cannot be loaded: {e}"
    dt = str(dtype).replace("torch.", "")
    if name != "reference":
        return name, f"the first backend rule that applies to {device}/{dt}"
    if torch.device(device).type == "cuda":
        bundle = os.environ.get("RNN_SPARSIFY_KERNELS")
        if not bundle:
            return name, ("no kernel bundle loaded: build one with `rnn-sparsify compile` and set "
                          "RNN_SPARSIFY_KERNELS=<bundle> (or cuda_backend.use_bundle(path))")
        from .kernels import cuda_backend

        errs = cuda_backend.load_errors()
        return name, f"bundle {bundle} not usable here: {errs or 'no kernel for this dtype/arch'}"
    return name, f"no faster backend applies to {device}/{dt}: torch index_select + matmul GEMMs"


def env_report(model_spec: Optional[str] = None) -> str:
    """What ``rnn-sparsify env`` prints: versions, toolchain, GPU, CPU ISA, kernel cache and,
    with a model, the backend each of its LSTMs would run on and why."""
    import platform
    from importlib import metadata

    import torch

    from . import __version__

    lines = [f"rnn_sparsify: {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
             f"python: {platform.python_version()} ({sys.executable})",
             f"OS: {platform.platform()}",
             f"torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'none, CPU-only'})"]
    try:
        tvm = metadata.version("apache-tvm")
        lines.append(f"TVM: {tvm} (apache-tvm-ffi {metadata.version('apache-tvm-ffi')})")
    except metadata.PackageNotFoundError:
        lines.append("TVM: not installed (needed only for `compile`: pip install -e '.[tvm]')")
    from .codegen.errors import ToolchainMissing
    from .codegen.toolchain import nvcc_path, nvcc_version

    try:
        lines.append(f"nvcc: {nvcc_version()} ({nvcc_path()})")
    except (ToolchainMissing, OSError) as e:
        lines.append(f"nvcc: not found ({e})")
    try:
        import cuda.bindings  # noqa: F401

        lines.append(f"cuda-bindings: {metadata.version('cuda-bindings')} (kernel bundle loader)")
    except (ImportError, metadata.PackageNotFoundError):
        lines.append("cuda-bindings: not installed (needed to run bundles on a GPU: pip install -e '.[gpu]')")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}, arch sm_{major}{minor}")
    else:
        lines.append("GPU: none (torch.cuda.is_available() is False)")
    isa = cpu_vector_isa()
    lines.append(f"CPU: {_cpu_name()}, {os.cpu_count()} logical cores, vector ISA: "
                 f"{' '.join(isa) if isa else 'unknown (no /proc/cpuinfo flags)'}")
    from .codegen.aot import default_cache_dir

    cache = default_cache_dir()
    if cache.is_dir():
        n, size = _folder_size(cache)
        lines.append(f"kernel cache: {cache} ({n} files, {size / 2**20:.1f} MiB)")
    else:
        lines.append(f"kernel cache: {cache} (empty: not created yet)")
    lines.append(f"RNN_SPARSIFY_KERNELS: {os.environ.get('RNN_SPARSIFY_KERNELS') or 'unset'}")
    lines.append("RNN_SPARSIFY_PERSISTENT_EVAL: " + (os.environ.get("RNN_SPARSIFY_PERSISTENT_EVAL") or "unset") +
                 " (auto|always|never; auto: CUDA eval of a pruned SparseLSTM runs the persistent kernels only "
                 "where the first call per shape measured them faster than nn.LSTM)")
    if model_spec:
        lines += ["", f"model {model_spec}:"] + _model_backends(model_spec)
    return "\n".join(lines) + "\n"


def _model_backends(spec: str) -> list[str]:
    import torch

    from .passes.find_lstm import display_fqn
    from .sparsify import NoLSTMFoundError, SKIPPED, inspect_model

    model = load_model(spec).module
    try:
        report = inspect_model(model)
    except NoLSTMFoundError as e:
        raise NoLSTMError(str(e)) from e
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for e in report.lstms:
        name = display_fqn(e.fqn) + (f"[{e.node}]" if e.node else "")
        try:
            w = next(iter(model.get_submodule(e.fqn).parameters()), None)
        except AttributeError:
            w = None
        if e.handling == SKIPPED and not e.reason.startswith("already sparse"):
            rows.append(f"  {name} ({e.kind}): not sparsified, runs as written: {e.reason}")
            continue
        dtype = w.dtype if w is not None else torch.float32
        try:
            mod = model.get_submodule(e.fqn)
        except AttributeError:
            mod = None
        for dev in devices:
            if dev == "cpu" and mod is not None and hasattr(mod, "input_size"):
                b, why = cpu_layer_choice(mod, dtype)
                from .kernels.cpu_sparse_eval import explain_eval

                ev = explain_eval(mod)
            else:
                b, why = backend_choice(dev, dtype)
                if mod is not None and getattr(mod, "weight_sparsity", None) is not None:
                    from .kernels.eval_rules import explain_cuda

                    ev = explain_cuda(mod)
                else:
                    ev = "eval() runs the dense PyTorch path"
            rows.append(f"  {name} ({e.kind}, {str(dtype).replace('torch.', '')}) on {dev}: {b} ({why}); {ev}")
        if mod is not None and getattr(mod, "weight_sparsity", None) is not None:
            from .kernels.eval_rules import explain

            rows.append(f"  {name}: {explain(mod)}")  # the whole eval rule list, CUDA included
    return rows


def _cmd_env(args: argparse.Namespace) -> int:
    _write(args.output, env_report(args.model))
    return 0


# ---------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rnn-sparsify compile: error: argument --p-input: ...``."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnn-sparsify", description="Structured-sparsity LSTM tools. Exit codes: "
                     + "; ".join(f"{k} {v.split(':')[0]}" for k, v in EXIT_CODES.items()) + ".")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="tracebacks on errors and the raw details of the report")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser(
        "inspect", parents=[common],
        help="find the LSTMs of a model and show how sparsify would handle them (changes nothing)",
        description="Load a model from a factory, run the graph passes on a copy and print every LSTM found, "
        "how it would be handled (graph rewrite / module swap / skipped) and why.",
    )
    p.add_argument("model", type=model_target, help="path/to/file.py:factory, package.module:factory (from the "
                   "current folder) or model.pt; the factory returns a module, (module, example_inputs) or "
                   "(module, example_inputs, example_kwargs)")
    p.add_argument("--config", action="append", metavar="JSON", type=config_json,
                   help='a config as JSON, e.g. \'{"kind": "structured_dropout", "p_input": 0.25, '
                   '"p_recurrent": 0.25}\' (repeatable)')
    p.add_argument("--format", choices=("table", "json", "dot"), default="table",
                   help="table (default), json (the report) or dot (fx graphs, LSTM subgraphs highlighted)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout (folders are created)")
    p.add_argument("--batch-size", type=positive_int, help="batch size for the FLOP estimate (> 0)")
    p.add_argument("--seq-len", type=positive_int, help="sequence length for the FLOP estimate (> 0)")
    p.add_argument("--no-inputs", action="store_true", help="ignore the example inputs the factory returns")
    p.set_defaults(func=_cmd_inspect, check=_check_inspect, subparser=p)
    e = sub.add_parser(
        "env", parents=[common], help="what this installation can do (versions, toolchain, GPU, CPU ISA, cache)",
        description="Print torch/TVM/nvcc versions, the GPU and its arch, the CPU vector ISA, the kernel cache and, "
        "for a model, which backend each LSTM would run on and why. Paste it into bug reports.",
    )
    e.add_argument("model", nargs="?", type=model_target, help="optional model target (as for inspect)")
    e.add_argument("-o", "--output", help="write to this file instead of stdout (folders are created)")
    e.set_defaults(func=_cmd_env, check=_check_output, subparser=e)
    from rnn_sparsify.codegen import cli as codegen_cli  # compile / bench (cheap: no TVM import)

    codegen_cli.register(sub, parents=[common])
    return parser


def _check_inspect(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.batch_size is None) != (args.seq_len is None):
        parser.error("--batch-size and --seq-len go together")
    _check_output(parser, args)


def _check_output(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    why = output_problem(args.output, folder=False) if args.output else None
    if why:
        parser.error(f"argument -o/--output: {why}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2, one line already printed)
        return int(e.code or 0)
    if not getattr(args, "func", None):
        print("rnn-sparsify: error: give a command: inspect, env, compile or bench (see rnn-sparsify --help)",
              file=sys.stderr)
        return 2
    if args.check is not None:
        try:
            args.check(args.subparser, args)
        except SystemExit as e:
            return int(e.code or 0)
    verbose = getattr(args, "verbose", False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("rnn-sparsify: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rnn-sparsify inspect ... | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0
    except Exception as e:  # noqa: BLE001 - every error ends in one line and an exit code
        from .codegen.errors import CodegenError

        if verbose:
            import traceback

            traceback.print_exc()
        if isinstance(e, CLIError):
            hint = f" (hint: {e.hint})" if e.hint else ""
            print(f"rnn-sparsify {args.command}: error: {_one_line(e)}{hint}", file=sys.stderr)
            return e.exit_code
        if isinstance(e, CodegenError) and e.exit_code != 1:
            print(f"rnn-sparsify {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return e.exit_code
        print(f"rnn-sparsify {args.command}: internal error: {type(e).__name__}: {_one_line(e)} -- {REPORT_HINT}",
              file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " / ".join(line.strip() for line in str(e).splitlines() if line.strip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
