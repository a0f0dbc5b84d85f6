"""The pass infrastructure of :func:`rnn_sparsify.sparsify`: named passes that say what they
require and what they ensure, run in order by a :class:`Pipeline` that checks both.

Modelled on torch.fx's pass infrastructure (``torch.fx.passes.infra.pass_manager``: passes,
constraints between them, checks run between passes), but on a whole-model state rather than
one graph: a pass reads and writes a :class:`SparsifyState`, and every *fact* a pass requires or
ensures is a named predicate on that state (:data:`FACTS`). The pipeline refuses, when it is
built, an order in which a pass requires a fact no earlier pass ensures, and checks, when it
runs, every required fact before a pass and every ensured fact after it (a broken pass stops
the run with :class:`PassContractError` naming the pass and the fact, instead of surfacing
later as a wrong model). The passes themselves are in :mod:`.sparsify_passes`;
``docs/architecture.md`` lists them with their facts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from torch import nn

__all__ = ["Pass", "Pipeline", "SparsifyState", "FACTS", "PassContractError"]


class PassContractError(AssertionError):
    """A pass ran without what it requires, or did not ensure what it promised (a bug in
    rnn_sparsify, never the user's model)."""


@dataclass
class SparsifyState:
    """Everything the passes share. Inputs first; every other field is None until the pass
    that ensures it has run."""

    model: nn.Module  # the caller's model: read, never written
    configs: tuple
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
    example_inputs: Any = None
    example_kwargs: Optional[dict] = None
    applied: bool = True
    cfg: Any = None  # dispatched configs (.structured_dropout, .gate_sparsity, .weight_sparsity)
    work: Optional[nn.Module] = None  # the copy that is rewritten
    observed: Optional[dict] = None  # id(module) -> {"calls", "tokens", "batch"}
    signatures: Optional[dict] = None  # id(module) -> set of argument-type patterns
    first_calls: Optional[dict] = None  # id(module) -> (args, kwargs) of its first call
    none_args: Optional[dict] = None  # id(module) -> parameters traced as None
    tr: Any = None  # TraceResult
    sites: Optional[list] = None  # LSTMSite, one per LSTM-like thing
    entries: Optional[list] = None  # LSTMEntry, one per site (same order)
    by_site: Optional[dict] = None  # id(site) -> entry
    layers: Optional[list] = None  # captured hand-written layers (capture pass)
    errors: list = field(default_factory=list)  # "name: error" of LSTMs whose handling failed
    module_undos: Optional[dict] = None  # id(site) -> ModuleUndo of a swapped module
    swapped: Optional[dict] = None  # fqn (and aliases) -> entry of every swapped LSTM
    graph_work: Optional[list] = None  # per traced graph: cells rewritten, undo (rewrite cells)
    pending: Optional[list] = None  # graph forwards to install (fuse dropout, rewrite layers)
    graph_rewrites: Optional[dict] = None
    dropouts: Optional[list] = None
    entries_final: bool = False
    installed: bool = False
    verification: Optional[dict] = None
    verified: bool = False
    report: Any = None


# fact name -> (predicate on the state, what it means)
FACTS: dict[str, tuple[Callable[[SparsifyState], bool], str]] = {
    "copied": (lambda s: s.work is not None and s.work is not s.model and s.cfg is not None,
               "the model is copied and the configs dispatched by type"),
    "observed": (lambda s: s.observed is not None and s.signatures is not None and s.first_calls is not None
                 and s.none_args is not None,
                 "calls, tokens and argument patterns of every module on the example inputs (empty without)"),
    "traced": (lambda s: s.tr is not None, "fx graphs where fx can trace, opaque modules elsewhere"),
    "found": (lambda s: s.sites is not None and s.entries is not None and len(s.entries) == len(s.sites),
              "one site and one report entry per LSTM-like thing"),
    "layers_captured": (lambda s: s.layers is not None,
                        "hand-written layers in untraceable code captured by running them, or refused"),
    "planned": (lambda s: s.entries is not None and all(e.reason or e.handling != "skipped" for e in s.entries),
                "every entry has its handling and reason"),
    "swapped": (lambda s: s.swapped is not None and s.module_undos is not None,
                "every LSTM module planned for a swap is sparse in place, or skipped with the error"),
    "weight_sparsity_attached": (lambda s: s.swapped is not None and all(
        e.weight_sparsity is not None for e in s.entries if e.handling == "module swap")
        if s.cfg.weight_sparsity is not None else s.swapped is not None,
        "every swapped LSTM has its masks when a WeightSparsity config is given"),
    "cells_rewritten": (lambda s: s.graph_work is not None,
                        "hand-written cells replaced by sparse cell regions in their graphs"),
    "dropout_fused": (lambda s: s.pending is not None and s.dropouts is not None and s.graph_rewrites is not None,
                      "dropouts feeding an LSTM fused or refused; graph forwards to install listed"),
    "layers_rewritten": (lambda s: s.layers is not None and all(getattr(l, "done", False) for l in s.layers),
                         "captured layers rewritten (their forwards listed to install) or refused"),
    "entries_final": (lambda s: s.entries_final, "configs and layer backend of every handled entry"),
    "installed": (lambda s: s.installed, "every rewritten forward installed behind its guard"),
    "verified": (lambda s: s.verified, "with example inputs, eval() outputs checked; differing rewrites undone"),
    "reported": (lambda s: s.report is not None, "the SparsifyReport is built"),
}


class Pass:
    """One named step. Subclasses set ``name``, ``requires``, ``ensures`` (fact names of
    :data:`FACTS`) and implement :meth:`run`."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()

    def run(self, state: SparsifyState) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}: requires {', '.join(self.requires) or '-'}; ensures {', '.join(self.ensures)}>"


class Pipeline:
    """Passes in order; ``Pipeline(passes)`` checks the order, :meth:`run` the facts."""

    def __init__(self, passes: list[Pass]) -> None:
        have: set[str] = set()
        for p in passes:
            unknown = [f for f in (*p.requires, *p.ensures) if f not in FACTS]
            if unknown:
                raise PassContractError(f"pass {p.name!r} names unknown facts {unknown}")
            missing = [f for f in p.requires if f not in have]
            if missing:
                raise PassContractError(f"pass {p.name!r} requires {missing}, which no earlier pass ensures")
            have.update(p.ensures)
        self.passes = list(passes)

    def run(self, state: SparsifyState) -> SparsifyState:
        for p in self.passes:
            bad = [f for f in p.requires if not FACTS[f][0](state)]
            if bad:
                raise PassContractError(f"before pass {p.name!r}: required facts do not hold: {bad}")
            p.run(state)
            bad = [f for f in p.ensures if not FACTS[f][0](state)]
            if bad:
                raise PassContractError(f"after pass {p.name!r}: ensured facts do not hold: {bad}")
        return state

    def describe(self) -> list[dict]:
        """``[{"name", "requires", "ensures"}]`` in order (docs and tests read this)."""
        return [{"name": p.name, "requires": list(p.requires), "ensures": list(p.ensures)} for p in self.passes]
