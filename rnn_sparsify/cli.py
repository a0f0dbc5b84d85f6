"""``rnn-sparsify``: command-line front end (thin; every action is a library call).

``rnn-sparsify inspect path/to/file.py:factory`` (or ``package.module:factory``) builds the
model, runs the graph passes on a copy (nothing is changed) and prints what was found.
The factory returns an ``nn.Module`` or ``(module, example_inputs)``; with example inputs
the report also counts the tokens each LSTM sees and the FLOPs. Python equivalents:
:func:`load_factory`, :func:`rnn_sparsify.sparsify.inspect_model`,
:meth:`SparsifyReport.table`/``to_dict``, :func:`rnn_sparsify.passes.dot.to_dot`.

Exit codes: 0 ok; 2 bad arguments or config; 3 model file/module/factory not found;
4 the factory raised or returned something else than a module; 5 no LSTM in the model;
6 the example inputs do not run through the model.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Optional, Sequence

__all__ = ["main", "load_factory", "CLIError", "ModelSpecError", "FactoryError", "ExampleInputsError",
           "ConfigArgError", "run_inspect"]


class CLIError(Exception):
    exit_code = 1
    hint = ""


class ConfigArgError(CLIError, ValueError):
    exit_code = 2
    hint = "configs: --config '{\"kind\": \"structured_dropout\", \"p_input\": 0.25}'"


class ModelSpecError(CLIError, LookupError):
    exit_code = 3
    hint = "give the model as path/to/file.py:factory or package.module:factory"


class FactoryError(CLIError, RuntimeError):
    exit_code = 4
    hint = "the factory must return an nn.Module or (nn.Module, example_inputs)"


class NoLSTMError(CLIError, LookupError):
    exit_code = 5
    hint = "inspect looks for nn.LSTM, nn.LSTMCell and hand-written LSTM cells"


class ExampleInputsError(CLIError, ValueError):
    exit_code = 6
    hint = "pass --no-inputs to inspect without the factory's example inputs"


def load_factory(spec: str):
    """``file.py:factory`` or ``module:factory`` -> ``(model, example_inputs or None)``."""
    from torch import nn

    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelSpecError(f"model spec {spec!r} is not 'path/to/file.py:factory' or 'module:factory'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        if not os.path.isfile(target):
            raise ModelSpecError(f"no such file: {target}")
        name = "rnn_sparsify_user_" + os.path.splitext(os.path.basename(target))[0]
        mspec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module  # dataclasses / pickling look the module up by name
        try:
            mspec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise FactoryError(f"importing {target} raised {type(e).__name__}: {e}") from e
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the working directory
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelSpecError(f"cannot import module {target!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelSpecError(f"{target} has no attribute {attr!r}")
    if isinstance(factory, nn.Module):
        return factory, None
    if not callable(factory):
        raise FactoryError(f"{target}:{attr} is neither a module nor callable")
    try:
        out = factory()
    except Exception as e:
        raise FactoryError(f"{target}:{attr}() raised {type(e).__name__}: {e}") from e
    if isinstance(out, nn.Module):
        return out, None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module):
        return out[0], out[1]
    raise FactoryError(f"{target}:{attr}() returned {type(out).__name__}, not an nn.Module or (nn.Module, inputs)")


def _configs(args: argparse.Namespace) -> list:
    from .config import config_from_dict

    cfgs = []
    for text in args.config or []:
        try:
            cfgs.append(config_from_dict(json.loads(text)))
        except (ValueError, TypeError) as e:
            raise ConfigArgError(f"bad --config {text!r}: {e}") from e
    return cfgs


def run_inspect(spec: str, configs: Sequence = (), *, use_inputs: bool = True, fmt: str = "table",
                batch_size: Optional[int] = None, seq_len: Optional[int] = None) -> str:
    """What ``rnn-sparsify inspect`` prints, as a string (raises the CLI's typed errors)."""
    from .sparsify import NoLSTMFoundError, inspect_model

    model, inputs = load_factory(spec)
    if fmt == "dot":
        from rnn_sparsify.passes.dot import to_dot

        try:
            inspect_model(model, *configs)  # for the "no LSTM" check
        except NoLSTMFoundError as e:
            raise NoLSTMError(str(e)) from e
        return to_dot(model)
    try:
        report = inspect_model(model, *configs, example_inputs=inputs if use_inputs else None)
    except NoLSTMFoundError as e:
        raise NoLSTMError(str(e)) from e
    except ValueError as e:
        if "example_inputs" in str(e):
            raise ExampleInputsError(str(e)) from e
        raise ConfigArgError(str(e)) from e
    except TypeError as e:
        raise ConfigArgError(str(e)) from e
    if fmt == "json":
        return json.dumps(report.to_dict(batch_size, seq_len), indent=2, default=str) + "\n"
    return report.table(batch_size, seq_len) + "\n"


def _cmd_inspect(args: argparse.Namespace) -> int:
    text = run_inspect(args.model, _configs(args), use_inputs=not args.no_inputs, fmt=args.format,
                       batch_size=args.batch_size, seq_len=args.seq_len)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnn-sparsify", description="Structured-sparsity LSTM training tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "inspect", help="find the LSTMs of a model and show how sparsify would handle them (changes nothing)",
        description="Load a model from a factory, run the graph passes on a copy and print every LSTM found, "
        "how it would be handled (graph rewrite / module swap / skipped) and why.",
    )
    p.add_argument("model", help="path/to/file.py:factory or package.module:factory; the factory returns a "
                   "module or (module, example_inputs)")
    p.add_argument("--config", action="append", metavar="JSON",
                   help='a config as JSON, e.g. \'{"kind": "structured_dropout", "p_input": 0.25, '
                   '"p_recurrent": 0.25}\' (repeatable)')
    p.add_argument("--format", choices=("table", "json", "dot"), default="table",
                   help="table (default), json (the report) or dot (fx graphs, LSTM subgraphs highlighted)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--batch-size", type=int, help="batch size for the FLOP estimate")
    p.add_argument("--seq-len", type=int, help="sequence length for the FLOP estimate")
    p.add_argument("--no-inputs", action="store_true", help="ignore the example inputs the factory returns")
    p.set_defaults(func=_cmd_inspect)
    try:
        from rnn_sparsify.codegen import cli as codegen_cli  # compile / bench, when installed
    except ImportError:
        codegen_cli = None
    if codegen_cli is not None and hasattr(codegen_cli, "register"):
        codegen_cli.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if (args.batch_size is None) != (args.seq_len is None) if args.command == "inspect" else False:
        parser.error("--batch-size and --seq-len go together")
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"rnn-sparsify: error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # errors of other subcommands that carry their own exit code
        code = getattr(e, "exit_code", None)
        if code is None:
            raise
        print(f"rnn-sparsify: error: {e}", file=sys.stderr)
        return int(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
