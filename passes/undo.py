"""Undo records: what handling one LSTM module or one traced graph changed, restored when
that handling fails or the verification pass rejects it (an error never half-rewrites a model)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ModuleUndo", "GraphUndo", "revert_graph"]


def revert_graph(owner: nn.Module, undo: "GraphUndo") -> None:
    """Give ``owner`` its original forward back and undo what its graph rewrite did."""
    base = getattr(owner, "_rnn_sparsify_base", None)
    if base is not None:
        owner.__class__ = base
    for k in [k for k in owner.__dict__ if k.startswith("_rnn_sparsify_")]:
        del owner.__dict__[k]
    undo.restore()


class ModuleUndo:
    """Everything :func:`swap_lstm` and ``attach_weight_sparsity`` change on one module
    (class, attributes, the dicts of parameters/buffers/hooks, parameter values), restored
    by :meth:`restore` if handling that module fails."""

    def __init__(self, m: nn.Module) -> None:
        self.m, self.cls = m, m.__class__
        self.attrs = dict(m.__dict__)
        self.dicts = {k: dict(v) for k, v in m.__dict__.items() if isinstance(v, dict)}
        self.values = {k: p.detach().clone() for k, p in m.named_parameters(recurse=False)}

    @torch.no_grad()
    def restore(self) -> None:
        m = self.m
        if getattr(m, "weight_sparsity", None) is not None and "weight_sparsity" not in self.attrs:
            from rnn_sparsify.weight_sparsity import detach_weight_sparsity

            try:
                detach_weight_sparsity(m)  # removes the gradient hooks of its parameters
            except Exception:  # noqa: BLE001 - best effort; the restore below still runs
                pass
        m.__class__ = self.cls
        m.__dict__.clear()
        m.__dict__.update(self.attrs)
        for k, v in self.dicts.items():
            m.__dict__[k].clear()
            m.__dict__[k].update(v)
        for k, v in self.values.items():
            getattr(m, k).copy_(v)


class GraphUndo:
    """Undo of one graph's rewrite: the cell regions added to ``owner`` and the configs of
    the swapped LSTMs that took over one of its dropouts."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        self.added: list[str] = []
        self.configs: list[tuple[nn.Module, Any, Any]] = []  # (module, structured_dropout, dropout)

    def remember(self, m: nn.Module) -> None:
        self.configs.append((m, m.structured_dropout, getattr(m, "dropout", None)))

    def restore(self) -> None:
        for name in self.added:
            self.owner._modules.pop(name, None)
        for m, sdv, drop in reversed(self.configs):
            m.structured_dropout = sdv
            if drop is not None:
                m.dropout = drop

