"""Naming a model on the command line, the typed errors of every command and their exit codes.

One loader serves every command (``inspect``, ``compile``, ``bench``, ``env``):
:func:`load_model` takes ``path/to/file.py:factory``, ``package.module:factory`` (imported
from the current folder, as ``python -m`` does) or a ``torch.save``'d model file
(``model.pt``). The factory returns a module, ``(module, example_inputs)`` or ``(module,
example_inputs, example_kwargs)``; a module object named directly is used as is.

The argparse ``type=`` validators here (:func:`probability`, :func:`positive_int`, ...) check
every option before any work; a bad value becomes exit code 2 with one line naming the option
and the allowed values. :data:`EXIT_CODES` is the table the README shows.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "EXIT_CODES", "CLIError", "ConfigArgError", "OutputError", "ModelSpecError", "FactoryError", "NoLSTMError",
    "ExampleInputsError", "NothingToBuildError", "EnvironmentMissing", "LoadedModel", "load_model",
    "probability", "positive_int", "arch", "gate_spec", "config_json", "model_target", "output_problem",
]

#: exit code -> meaning (the README's table is checked against this by a test)
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error: a bug in rnn_sparsify (the message says where to report it)",
    2: "bad command line: unknown option, bad value or range, bad --config",
    3: "model not found: no such file, module or factory",
    4: "the model's code failed: importing its file/module or calling the factory raised, "
       "or the factory returned something other than a module / (module, inputs[, kwargs])",
    5: "no LSTM in the model",
    6: "the factory's example inputs do not run through the model",
    7: "nothing to build: no LSTM of the model needs a sparse kernel (compile)",
    8: "this machine lacks what the command needs: TVM or nvcc (compile), a CUDA GPU (bench)",
    9: "a kernel bundle is missing, malformed or built for another GPU (bench)",
}

REPORT_HINT = ("this is a bug in rnn_sparsify, not in your model or options: please report it on the "
               "rnn_sparsify issue tracker with the command, the output of `rnn-sparsify env` and the "
               "traceback of the same command with --verbose")


class CLIError(Exception):
    """A user-facing error: one line (message + hint) and an exit code."""

    exit_code = 1
    hint = ""


class ConfigArgError(CLIError, ValueError):
    exit_code = 2
    hint = "configs: --config '{\"kind\": \"structured_dropout\", \"p_input\": 0.25}'"


class OutputError(CLIError, OSError):
    """``-o``/``--out`` cannot be written (exit 2, like any bad option value)."""

    exit_code = 2


class ModelSpecError(CLIError, LookupError):
    exit_code = 3
    hint = "name the model as path/to/file.py:factory or package.module:factory (from the current folder)"


class FactoryError(CLIError, RuntimeError):
    exit_code = 4
    hint = "the factory must return an nn.Module, (module, example_inputs) or (module, example_inputs, example_kwargs)"


class NoLSTMError(CLIError, LookupError):
    exit_code = 5
    hint = "rnn-sparsify looks for nn.LSTM, nn.LSTMCell and hand-written LSTM cells"


class ExampleInputsError(CLIError, ValueError):
    exit_code = 6
    hint = "fix the factory's example inputs, or pass --no-inputs"


class NothingToBuildError(CLIError, LookupError):
    exit_code = 7
    hint = ("pass --p-input/--p-recurrent/--gate to sparsify the model's LSTMs for the build, or give a model "
            "returned by sparsify(...) (a factory returning it, or a torch.save'd file)")


class EnvironmentMissing(CLIError, RuntimeError):
    exit_code = 8
    hint = "run `rnn-sparsify env` to see what this machine has"


# ---------------------------------------------------------------------------------------
# argparse validators: each raises ArgumentTypeError, which argparse turns into
# "argument --X: <message>" (exit 2)
def probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a probability in [0, 1)") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: a probability in [0, 1)")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer > 0") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: an integer > 0")
    return v


_ARCH = re.compile(r"sm_(\d{2,3})a?")


def arch(text: str) -> str:
    m = _ARCH.fullmatch(text)
    if m is None or int(m.group(1)) < 80:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not supported; allowed: sm_80 or newer (sm_80, sm_86, sm_89, sm_90, sm_90a, ...), "
            "the tensor-core kernels need ldmatrix + bf16 mma.sync")
    return text


_GATE_KEYS = {"coarse": {"P": int, "R": int, "S": int}, "fine": {"My": int, "Mx": int, "K": int},
              "meprop": {"keep": float}}
GATE_HELP = "coarse:P=4,R=8,S=4 | fine:My=8,Mx=4,K=4 | meprop:keep=0.5"


def gate_spec(text: str) -> dict:
    """``coarse:P=4,R=8,S=4`` | ``meprop:keep=0.5`` | ``fine:My=8,Mx=4,K=4`` -> config dict
    (checked by :class:`~rnn_sparsify.config.GateGradientSparsity`)."""
    from .config import GateGradientSparsity

    mode, _, rest = text.partition(":")
    if mode not in _GATE_KEYS:
        raise argparse.ArgumentTypeError(f"unknown mode {mode!r}; allowed: {GATE_HELP}")
    d: dict[str, Any] = {"mode": mode}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or k not in _GATE_KEYS[mode]:
            raise argparse.ArgumentTypeError(
                f"bad item {item!r} for mode {mode}; allowed keys: {', '.join(_GATE_KEYS[mode])} ({GATE_HELP})")
        try:
            d[k] = _GATE_KEYS[mode][k](v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{k}={v!r} is not a number ({GATE_HELP})") from None
    try:
        cfg = GateGradientSparsity(**d)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return cfg.to_dict()


def config_json(text: str):
    """A config as JSON -> the config object (``config_from_dict``)."""
    from .config import config_from_dict

    try:
        d = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e})") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object with a \"kind\"")
    try:
        return config_from_dict(d)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


_SAVED = (".pt", ".pth", ".pkl")


def model_target(text: str) -> str:
    """Syntax check of a model target (the file and factory are looked up later, exit 3)."""
    target, sep, attr = text.rpartition(":")
    if text.endswith(_SAVED) and not (sep and attr and not attr.endswith(_SAVED)):
        return text
    if not sep or not target or not attr or not attr.isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r} does not name a factory; allowed: path/to/file.py:factory, package.module:factory "
            "or a torch.save'd model file (.pt/.pth)")
    return text


def output_problem(path: str, *, folder: bool) -> Optional[str]:
    """Why ``path`` cannot be written as an output file (``folder=False``) or bundle folder
    (missing parent folders are fine: they are created); None if it can."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a folder"
    if not folder and os.path.isdir(path):
        return f"{path} is a folder; give a file name"
    parent = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, so {path} cannot be created"
    if not os.access(parent, os.W_OK):
        return f"no permission to write in {parent}"
    return None


# ---------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """What a model target gives: the module and, if the factory returned them, example inputs."""

    module: Any
    example_inputs: Optional[tuple] = None
    example_kwargs: Optional[dict] = None
    target: str = ""


def _import_file(target: str):
    if not os.path.isfile(target):
        raise ModelSpecError(f"no such file: {target} (looked in {os.getcwd()})")
    name = "rnn_sparsify_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(target))[0])
    mspec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module  # dataclasses / pickling look the module up by name
    folder = os.path.dirname(os.path.abspath(target))
    added = folder not in sys.path
    if added:  # the file's own imports of its neighbours work, as with `python file.py`
        sys.path.insert(0, folder)
    try:
        mspec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise FactoryError(f"importing {target} raised {type(e).__name__}: {e}") from e
    return module


def _import_module(target: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the working directory
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        # the module itself (or a package on its path) is missing: not found; a missing
        # import *inside* the user's module is the model's code failing
        if e.name is not None and (target == e.name or target.startswith(e.name + ".")):
            raise ModelSpecError(f"no module named {target!r} (from {os.getcwd()})") from e
        raise FactoryError(f"importing {target} raised {type(e).__name__}: {e}") from e
    except Exception as e:
        raise FactoryError(f"importing {target} raised {type(e).__name__}: {e}") from e


def _load_saved(path: str) -> LoadedModel:
    import torch
    from torch import nn

    if not os.path.isfile(path):
        raise ModelSpecError(f"no such file: {path} (looked in {os.getcwd()})")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the pickled classes' modules, as `python -m` finds them
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise FactoryError(f"torch.load({path!r}): the model's classes are pickled by module name and module "
                           f"{e.name!r} is not importable from {os.getcwd()}; run from the folder that holds it "
                           "or add that folder to PYTHONPATH") from e
    except Exception as e:
        raise FactoryError(f"torch.load({path!r}) raised {type(e).__name__}: {e}") from e
    if not isinstance(obj, nn.Module):
        raise FactoryError(f"{path} holds a {type(obj).__name__}, not a whole model (torch.save(model, path))")
    return LoadedModel(obj, target=path)


def load_model(spec: str) -> LoadedModel:
    """``file.py:factory`` | ``module:factory`` | ``model.pt`` -> :class:`LoadedModel`.

    Raises :class:`ModelSpecError` (not found, exit 3) or :class:`FactoryError` (the model's
    code raised or returned something else, exit 4).
    """
    from torch import nn

    target, sep, attr = spec.rpartition(":")
    if spec.endswith(_SAVED) and not (sep and attr and not attr.endswith(_SAVED)):
        return _load_saved(spec)
    if not sep or not target or not attr:
        raise ModelSpecError(f"model spec {spec!r} is not 'path/to/file.py:factory' or 'module:factory'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = _import_file(target)
    else:
        module = _import_module(target)
    factory = getattr(module, attr, None)
    if factory is None:
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ModelSpecError(f"{target} has no attribute {attr!r}"
                             + (f" (it defines: {', '.join(names[:8])})" if names else ""))
    if isinstance(factory, nn.Module):
        return LoadedModel(factory, target=spec)
    if not callable(factory):
        raise FactoryError(f"{target}:{attr} is neither a module nor callable")
    try:
        out = factory()
    except Exception as e:
        raise FactoryError(f"{target}:{attr}() raised {type(e).__name__}: {e}") from e
    if isinstance(out, nn.Module):
        return LoadedModel(out, target=spec)
    if isinstance(out, tuple) and len(out) in (2, 3) and isinstance(out[0], nn.Module):
        inputs = out[1]
        if inputs is not None and not isinstance(inputs, tuple):
            inputs = (inputs,)
        kwargs = out[2] if len(out) == 3 else None
        if kwargs is not None and not isinstance(kwargs, dict):
            raise FactoryError(f"{target}:{attr}() returned example_kwargs of type {type(kwargs).__name__}, not a dict")
        return LoadedModel(out[0], inputs, kwargs, target=spec)
    what = type(out).__name__ if not isinstance(out, tuple) else f"a tuple of {len(out)} ({', '.join(type(o).__name__ for o in out)})"
    raise FactoryError(f"{target}:{attr}() returned {what}, not a module, (module, example_inputs) or "
                       "(module, example_inputs, example_kwargs)")
