"""Where in the user's code: ``file.py:line`` of fx nodes and of tracing errors, in user terms.

The passes report what stopped them in the user's source terms (file, line, the line's code,
module path), not in fx's: :class:`~.trace.LeafTracer` stamps every node with the innermost
frame of the user's code that created it (:func:`record_location`, cheaper than fx's
``record_stack_traces`` and not printed in ``gm.code``), and :func:`explain_untraceable` turns a
tracing exception into the construct, its line, what is done instead and what to do (the raw
text goes to ``TraceResult.details``).
"""
from __future__ import annotations

import os
import sys
import sysconfig
import traceback

import torch
from torch import fx, nn

__all__ = ["LOCATION_KEY", "node_location", "record_location", "explain_untraceable"]

# Frames in these folders are not the user's code (torch, this package, the standard library).
_NOT_USER = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch, fx))
_OURS = tuple({os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + d + os.sep
               for d in ("rnn_sparsify", "passes", "codegen")})
_STDLIB = tuple({sysconfig.get_paths()["stdlib"] + os.sep})
LOCATION_KEY = "rnn_sparsify_location"  # node.meta key: "file.py:line" of the user's code


def _is_user_file(filename: str) -> bool:
    f = os.path.abspath(filename) if not filename.startswith("<") else filename
    return not (f.startswith("<") or f.startswith(_NOT_USER) or f.startswith(_OURS) or f.startswith(_STDLIB))


def _short_path(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive
        return filename
    return rel if not rel.startswith("..") else filename


def _format_location(filename: str, lineno: int, code: str = "") -> str:
    loc = f"{_short_path(filename)}:{lineno}"
    return f"{loc} `{code.strip()}`" if code and code.strip() else loc



def record_location(node: fx.Node) -> fx.Node:
    """Stamp ``node`` with the innermost frame of the user's code on the stack (if any)."""
    f = sys._getframe(1)
    while f is not None and not _is_user_file(f.f_code.co_filename):
        f = f.f_back
    if f is not None:
        node.meta[LOCATION_KEY] = f"{_short_path(f.f_code.co_filename)}:{f.f_lineno}"
    return node


def node_location(node: fx.Node) -> str:
    """``file.py:line`` of the user's code that created ``node`` ("" if unknown)."""
    return node.meta.get(LOCATION_KEY, "")


# what fx raised -> (what construct it is, what the user can do)
_CAUSES = (
    (("symbolically traced variables cannot be used as inputs to control flow",),
     "Python control flow (if / while / assert) on a tensor value",
     "move the branch into a submodule, or make it a tensor operation (torch.where)"),
    (("cannot be interpreted as an integer", "has no len()", "object is not iterable", "Proxy' object is not",
      "positional argument", "iter(", "Proxy"),
     "a tensor value used where Python needs a plain number (range(len(x)), a size given to torch.zeros(...), "
     "iteration over a tensor)",
     "use tensor methods (x.new_zeros(...), x.size(0) passed on as a tensor) or move the loop into a submodule"),
    (("__cuda_array_interface__", "__array", "tolist", "numpy", "item()", "pack_padded_sequence"),
     "a call that needs real tensor data (pack_padded_sequence with lengths, .tolist(), .item(), numpy)",
     "nothing for sparsity (the LSTMs inside are swapped and sparse); for dropout fusion, move that call into "
     "a submodule of its own"),
)


def explain_untraceable(module: nn.Module, e: BaseException) -> str:
    """Why ``module`` could not be traced, in the user's terms: the construct, where in their
    source (file:line `code`), what is done instead and what they can do. The raw exception
    text goes to ``TraceResult.details``."""
    frames = [fr for fr in traceback.extract_tb(e.__traceback__) if _is_user_file(fr.filename)]
    where = f" at {_format_location(frames[-1].filename, frames[-1].lineno, frames[-1].line or '')}" if frames else ""
    raw = f"{type(e).__name__}: {e}"
    what, todo = "code torch.fx cannot trace", "make that line traceable (see torch.fx's limitations)"
    for keys, cause, advice in _CAUSES:
        if any(k in raw for k in keys):
            what, todo = cause, advice
            break
    return (f"{type(module).__name__}.forward cannot be traced by torch.fx: {what}{where}. Done instead: its LSTMs "
            f"are swapped in place (module swap), dropouts around them stay as written. What you can do: {todo}")
