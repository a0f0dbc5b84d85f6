"""Fuse a dropout that feeds an LSTM's input into the sparse LSTM's structured NR dropout.

Matched (in a traced graph)::

    Before                                       After
    d = self.drop(x)      # nn.Dropout(p)        y = self.lstm(x)   # SparseLSTM, p_input = p
    y = self.lstm(d)                             (``self.drop`` stays registered, unused)

    d = F.dropout(x, p, self.training)           same, for F.dropout / torch.dropout
    y = self.lstm(d)

The element-wise Bernoulli dropout becomes the structured one (one mask per time step,
shared by the batch, exact kept count), so the input GEMM skips the dropped columns.
Targets are ``call_module`` nodes of ``nn.LSTM``/``nn.LSTMCell`` and of rewritten
hand-written cells (their ``x`` argument).

Refused (reported, graph unchanged): the dropped tensor has other users (a residual would
see a different tensor); the dropout is in place and its input has other users; the
dropout is not element-wise (``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``);
the tensor reaches the LSTM as ``hx`` rather than as its input; a functional dropout whose
``training`` is written as ``True`` (active in ``eval()`` too); the LSTM is called more than
once (the caller refuses: its dropout config would apply to every call). A functional dropout
with ``training=False`` is no dropout and is left as written.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from .trace import is_dynamic_dropout

__all__ = ["DropoutFeed", "DropoutRefusal", "find_dropout_feeds", "fuse_dropout"]

_FN_DROPOUT = (F.dropout, torch.dropout)
_OTHER_DROPOUT_FNS = (F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_OTHER_DROPOUT_MODULES = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class DropoutFeed:
    dropout: fx.Node
    target: fx.Node  # the LSTM (or cell region) call it feeds
    p: float
    source: str  # e.g. "nn.Dropout 'drop'" or "F.dropout"

    def to_dict(self) -> dict:
        from .user_code import node_location

        return {"node": self.dropout.name, "source": self.source, "p": self.p, "location": node_location(self.dropout)}


@dataclass
class DropoutRefusal:
    dropout: str
    target: str
    reason: str
    location: str = ""  # file.py:line of the dropout in the user's code

    def to_dict(self) -> dict:
        return {"node": self.dropout, "target": self.target, "reason": self.reason, "location": self.location}


def _dropout_info(gm: fx.GraphModule, node: fx.Node) -> Union[None, str, tuple[float, bool, str]]:
    """(p, inplace, source) for element-wise dropout; a reason for other dropouts; None otherwise."""
    if node.op == "call_module":
        try:
            m = gm.get_submodule(node.target)
        except AttributeError:
            return None
        if type(m) is nn.Dropout:
            return float(m.p), bool(m.inplace), f"nn.Dropout '{node.target}'"
        if isinstance(m, _OTHER_DROPOUT_MODULES):
            return f"{type(m).__name__} '{node.target}' is not element-wise dropout"
        return None
    if node.op == "call_function" and node.target in _FN_DROPOUT:
        a = list(node.args)
        if node.target is F.dropout:
            p = a[1] if len(a) > 1 else node.kwargs.get("p", 0.5)
            inplace = a[3] if len(a) > 3 else node.kwargs.get("inplace", False)
        else:
            p = a[1] if len(a) > 1 else node.kwargs.get("p")
            inplace = False
        if not is_dynamic_dropout(node):
            flag = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            if not flag:
                return None  # training=False: the identity, not a dropout; left as written
            return (f"{node.name}: training=True is written in the call, so it is active in eval() too "
                    "(structured dropout is training-only)")
        if not isinstance(p, (int, float)):
            return f"{node.name}: dropout probability is not a constant"
        return float(p), bool(inplace), ("F.dropout" if node.target is F.dropout else "torch.dropout")
    if node.op == "call_function" and node.target in _OTHER_DROPOUT_FNS:
        return f"{node.name} ({node.target.__name__}) is not element-wise dropout"
    return None


def find_dropout_feeds(
    gm: fx.GraphModule, is_target: Callable[[fx.Node], bool]
) -> tuple[list[DropoutFeed], list[DropoutRefusal]]:
    """Dropouts whose output is the input of a target node (see module docstring)."""
    feeds, refused = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_target(node) or not node.args:
            continue
        for k, arg in enumerate(list(node.args) + list(node.kwargs.values())):
            if not isinstance(arg, fx.Node):
                continue
            info = _dropout_info(gm, arg)
            if info is None:
                continue
            if k != 0:
                refused.append(DropoutRefusal(arg.name, node.name, "dropout output is the LSTM's state, not its input"))
                continue
            if isinstance(info, str):
                refused.append(DropoutRefusal(arg.name, node.name, info))
                continue
            p, inplace, source = info
            others = [u.name for u in arg.users if u is not node]
            if others or list(node.args).count(arg) > 1:
                refused.append(DropoutRefusal(arg.name, node.name, f"dropout output is also used by {others or [node.name]}"))
                continue
            src = arg.args[0] if arg.args else arg.kwargs.get("input")
            if inplace and isinstance(src, fx.Node) and len(src.users) > 1:
                refused.append(DropoutRefusal(arg.name, node.name, "in-place dropout whose input has other users"))
                continue
            feeds.append(DropoutFeed(arg, node, p, source))
    from .user_code import node_location

    by_name = {n.name: n for n in gm.graph.nodes}
    for r in refused:
        r.location = node_location(by_name[r.dropout]) if r.dropout in by_name else ""
    return feeds, refused


def fuse_dropout(gm: fx.GraphModule, feed: DropoutFeed) -> PassResult:
    """Remove ``feed.dropout``; the target reads the dropout's input. The caller sets the
    target module's ``StructuredDropout.p_input``. Post: ``gm`` lints, the node is gone."""
    d = feed.dropout
    src = d.args[0] if d.args else d.kwargs["input"]
    feed.target.replace_input_with(d, src)
    gm.graph.erase_node(d)
    for n in list(gm.graph.nodes):  # the self.training read of a removed F.dropout
        if n.op == "get_attr" and n.target == "training" and not n.users:
            gm.graph.erase_node(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)


def dropout_source_of(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    info = _dropout_info(gm, node)
    return info[2] if isinstance(info, tuple) else None


_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def untraced_dropouts(model: nn.Module, opaque: dict[str, str], lstm_fqns: list[str]) -> list[dict]:
    """Dropout modules that are children of an untraceable module holding an LSTM: without a
    graph nothing shows whether they feed it, so they are listed (not fused) with the reason."""
    out = []
    for ofqn in opaque:
        lstms = [f for f in lstm_fqns if not ofqn or f.startswith(ofqn + ".")]
        if not lstms:
            continue
        owner = model.get_submodule(ofqn)
        for name, child in owner.named_children():
            if isinstance(child, _DROPOUT_MODULES):
                fqn = f"{ofqn}.{name}" if ofqn else name
                where = ofqn or "<root>"
                out.append({
                    "node": fqn, "source": f"{type(child).__name__} '{fqn}'", "p": float(child.p),
                    "target": ", ".join(lstms), "fused": False, "graph": None, "location": "",
                    "reason": (f"{type(owner).__name__}.forward ({where}) cannot be traced, so nothing shows whether "
                               "it feeds the LSTM; it stays as written. What you can do: make that forward "
                               "traceable (see untraceable), or drop it and give the LSTM StructuredDropout(p_input=...)"),
                })
    return out
