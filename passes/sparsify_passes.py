"""The passes of :func:`rnn_sparsify.sparsify`, in order (:data:`SPARSIFY_PASSES`), each with
what it requires and ensures (facts of :mod:`.pipeline`).

An error while handling one LSTM (swap, weight sparsity, a graph's cells or dropouts, a
captured layer) skips that LSTM with the error in the report and undoes what was done to it;
``sparsify`` raises only when nothing could be handled. The caller's model is never touched:
the first pass copies it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from rnn_sparsify.config import GateGradientSparsity, StructuredDropout
from rnn_sparsify.report import (GRAPH_REWRITE, MODULE_SWAP, SKIPPED, LSTMEntry, NoLSTMFoundError, SparsifyReport,
                                 display_fqn)

from .pipeline import Pass, Pipeline, SparsifyState
from .undo import GraphUndo, ModuleUndo, revert_graph

__all__ = ["SPARSIFY_PASSES", "sparsify_pipeline", "run_sparsify", "Configs", "dispatch_configs"]


# ---------------------------------------------------------------------------------------
# configs
@dataclass(frozen=True)
class Configs:
    structured_dropout: Optional[StructuredDropout] = None
    gate_sparsity: Optional[GateGradientSparsity] = None
    weight_sparsity: Any = None

    def to_list(self) -> list[dict]:
        return [c.to_dict() for c in (self.structured_dropout, self.gate_sparsity, self.weight_sparsity) if c is not None]


def dispatch_configs(configs: tuple) -> Configs:
    """Configs by type, one of each at most."""
    slots: dict[str, Any] = {}
    handlers: dict[type, str] = {StructuredDropout: "structured_dropout", GateGradientSparsity: "gate_sparsity"}
    try:
        from rnn_sparsify.weight_sparsity import WeightSparsity

        handlers[WeightSparsity] = "weight_sparsity"
    except ImportError:  # weight sparsity not installed in this build
        pass
    for cfg in configs:
        slot = handlers.get(type(cfg))
        if slot is None:
            known = ", ".join(k.__name__ for k in handlers)
            raise TypeError(f"sparsify: unknown config type {type(cfg).__name__}; expected one of: {known}")
        if slot in slots:
            raise ValueError(f"sparsify: two {type(cfg).__name__} configs given; pass one of each type")
        slots[slot] = cfg
    return Configs(**slots)


def _fail(e: LSTMEntry, err: BaseException, errors: list[str]) -> None:
    e.handling = SKIPPED
    e.reason = f"error while handling it (skipped, model unchanged there): {type(err).__name__}: {err}"
    e._sd = e._gs = None
    e.fused_dropout = None
    e.weight_sparsity = None
    e.__dict__.pop("_region", None)
    e.__dict__.pop("_module", None)
    errors.append(f"{display_fqn(e.fqn)}: {type(err).__name__}: {err}")


# ---------------------------------------------------------------------------------------
class CopyPass(Pass):
    """Check the arguments, dispatch the configs by type, deep-copy the model (TorchScript
    submodules by a save/load round trip, ``__slots__`` values explicitly)."""

    name, requires, ensures = "copy", (), ("copied",)

    def run(self, s: SparsifyState) -> None:
        from .observe import copy_model

        if not isinstance(s.model, nn.Module):
            raise TypeError(f"sparsify: model must be an nn.Module, got {type(s.model).__name__}")
        if s.filter_fn is not None and not callable(s.filter_fn):
            raise TypeError("sparsify: filter_fn must be callable as filter_fn(module, fqn) -> bool")
        s.cfg = dispatch_configs(s.configs)
        s.work = copy_model(s.model)


class ObservePass(Pass):
    """With example inputs: run the copy once in eval() under no_grad, recording every
    module's calls, tokens, argument patterns and first arguments (the copy's Python state
    is restored). The optional arguments never passed are traced as None."""

    name, requires, ensures = "observe", ("copied",), ("observed",)

    def run(self, s: SparsifyState) -> None:
        from .observe import never_passed, observe

        s.signatures, s.first_calls = {}, {}
        s.observed = (observe(s.work, s.example_inputs, s.example_kwargs, s.signatures, s.first_calls)
                      if s.example_inputs is not None or s.example_kwargs is not None else {})
        s.none_args = never_passed(s.work, s.signatures)


class TracePass(Pass):
    """fx-trace what can be traced with LSTMs as leaves; untraceable modules stay opaque and
    their children are traced alone."""

    name, requires, ensures = "trace", ("observed",), ("traced",)

    def run(self, s: SparsifyState) -> None:
        from .trace import trace_degrading

        s.tr = trace_degrading(s.work, s.none_args)


class FindPass(Pass):
    """Every ``nn.LSTM``/``nn.LSTMCell`` (and subclass), hand-written cell in a traced graph,
    TorchScript module, and probable hand-written layer in untraceable code; one report entry
    each."""

    name, requires, ensures = "find", ("traced",), ("found",)

    def run(self, s: SparsifyState) -> None:
        from .find_lstm import find_lstms

        s.sites = find_lstms(s.work, s.tr)
        s.entries, s.by_site = [], {}
        for site in s.sites:
            e = LSTMEntry(site.fqn, site.kind, site.shapes, SKIPPED, "", site.location, node=site.node)
            s.by_site[id(site)] = e
            s.entries.append(e)
            if site.module is not None and id(site.module) in s.observed:
                e.observed = dict(s.observed[id(site.module)])


class CaptureLayersPass(Pass):
    """Hand-written LSTM layers in untraceable code: with example inputs, each probable layer
    is captured by running it on the arguments it was called with (a recording trace that
    unrolls its Python loop) and its repeated cell matched; without, it stays reported with
    what would let sparsify handle it."""

    name, requires, ensures = "capture layers", ("found", "observed"), ("layers_captured",)

    def run(self, s: SparsifyState) -> None:
        from .capture import capture_layers

        s.layers = capture_layers(s)


class PlanPass(Pass):
    """Decide per entry: module swap, graph rewrite or skipped, with the reason (filter_fn,
    refusals, configs that do not fit); raise NoLSTMFoundError when nothing is rewritable."""

    name, requires, ensures = "plan", ("found", "layers_captured"), ("planned",)

    def run(self, s: SparsifyState) -> None:
        from .find_lstm import PROBABLE_LAYER

        sd, gs, ws = s.cfg.structured_dropout, s.cfg.gate_sparsity, s.cfg.weight_sparsity
        for site in s.sites:
            e = s.by_site[id(site)]
            if site.refusal:
                e.reason = site.refusal
                continue
            if s.filter_fn is not None and not s.filter_fn(site.module, site.fqn):
                e.reason = "excluded by filter_fn"
                continue
            e._sd, e._gs = sd, gs
            if site.match is not None:
                if site.match.norms and gs is not None:
                    e._gs = None
                    msg = ("gate-gradient sparsity not applied: normalisation between the projections and the "
                           "gates makes the projections' gradient dense again")
                    if sd is None:
                        e.reason = msg
                        continue
                    e.reason = msg + "; "
                e.handling = GRAPH_REWRITE
                e.reason += f"{site.match.describe()}; h found as: {site.match.how_h_found}"
                if getattr(site, "layer", None) is not None:
                    e.reason += f"; {site.layer.describe()}"
            else:
                if gs is not None:
                    try:
                        gs.validate_for(site.shapes["hidden_size"], display_fqn(site.fqn))
                    except ValueError as err:
                        e.reason = str(err)
                        e._sd = e._gs = None
                        continue
                if ws is not None:
                    from rnn_sparsify.weight_sparsity import check_weight_sparsity_fits

                    try:
                        check_weight_sparsity_fits(site.module, ws)
                    except ValueError as err:
                        e.reason = f"weight sparsity does not fit this LSTM: {err}"
                        e._sd = e._gs = None
                        continue
                e.handling = MODULE_SWAP
                if type(site.module) in (nn.LSTM, nn.LSTMCell):
                    what = f"re-classed as Sparse{type(site.module).__name__} in place"
                else:
                    base = "SparseLSTM" if isinstance(site.module, nn.LSTM) else "SparseLSTMCell"
                    name = type(site.module).__name__
                    what = (f"re-classed as Sparse{name} (MRO Sparse{name} -> {name} -> {base}): its own forward "
                            f"is kept and its super().forward reaches {base}")
                e.reason = f"{what}; {site.location}"
        if s.sites and all(site.kind == PROBABLE_LAYER for site in s.sites):
            raise NoLSTMFoundError("no LSTM that sparsify can rewrite; " + "; ".join(
                f"{display_fqn(site.fqn)}: {site.refusal}" for site in s.sites))
        if not s.sites:
            raise NoLSTMFoundError(
                "no nn.LSTM, nn.LSTMCell, hand-written LSTM cell or TorchScript module found in the model"
                + (f" (untraceable: {', '.join(display_fqn(k) for k in s.tr.opaque)})" if s.tr.opaque else "")
            )


class SwapModulesPass(Pass):
    """Re-class every planned ``nn.LSTM``/``nn.LSTMCell`` in place as its sparse class (a
    subclass keeps its own forward); each contained: an error restores the module and skips
    that LSTM only."""

    name, requires, ensures = "swap modules", ("planned",), ("swapped",)

    def run(self, s: SparsifyState) -> None:
        from .rewrite import swap_lstm

        s.module_undos = {}
        for site in s.sites:
            e = s.by_site[id(site)]
            if e.handling != MODULE_SWAP:
                continue
            undo = ModuleUndo(site.module)
            try:
                swap_lstm(site.module, e._sd, e._gs)  # in place: every reference sees the sparse module
            except Exception as err:  # noqa: BLE001 - contained: reported, the module restored
                undo.restore()
                _fail(e, err, s.errors)
                continue
            s.module_undos[id(site)] = undo
            e.__dict__["_module"] = site.module
        s.swapped = {}
        for site in s.sites:  # aliases of swapped modules point at the same entry
            e = s.by_site[id(site)]
            if e.handling == MODULE_SWAP:
                s.swapped[e.fqn] = e
                for a in site.aliases:
                    s.swapped[a] = e


class AttachWeightSparsityPass(Pass):
    """With a ``WeightSparsity`` config: masks (bool buffers ``<param>_mask``), gradient hooks
    and load hooks on every swapped LSTM; an error undoes that LSTM's swap too."""

    name, requires, ensures = "attach weight sparsity", ("swapped",), ("weight_sparsity_attached",)

    def run(self, s: SparsifyState) -> None:
        if s.cfg.weight_sparsity is None:
            return
        import rnn_sparsify.weight_sparsity as ws  # looked up at call time (tests patch it)

        for site in s.sites:
            e = s.by_site[id(site)]
            if e.handling != MODULE_SWAP:
                continue
            try:
                ws.attach_weight_sparsity(site.module, s.cfg.weight_sparsity, name=site.fqn)
                e.weight_sparsity = ws.weight_sparsity_stats(site.module)
            except Exception as err:  # noqa: BLE001 - contained: the swap is undone too
                s.module_undos.pop(id(site)).restore()
                _fail(e, err, s.errors)
                for k in [k for k, v in s.swapped.items() if v is e]:
                    del s.swapped[k]


@dataclass
class _GraphWork:
    gfqn: str
    tg: Any
    cells: list  # (site, entry)
    undo: GraphUndo
    regions: list  # (site, entry, region)
    targets: dict  # region name -> entry
    changes: list
    failed: Optional[dict] = None  # the dropout record of a failed rewrite


class RewriteCellsPass(Pass):
    """Per traced graph: each planned hand-written cell becomes one call of a parameter-free
    ``SparseCellRegion`` that receives the cell's parameters (nothing renamed); contained per
    graph: an error skips that graph's cells."""

    name, requires, ensures = "rewrite cells", ("planned",), ("cells_rewritten",)

    def run(self, s: SparsifyState) -> None:
        from .rewrite import build_region, rewrite_cell

        s.graph_work = []
        for gfqn, tg in s.tr.graphs.items():
            cells = [(site, s.by_site[id(site)]) for site in s.sites
                     if site.graph_fqn == gfqn and site.match is not None and getattr(site, "layer", None) is None
                     and s.by_site[id(site)].handling == GRAPH_REWRITE]
            gw = _GraphWork(gfqn, tg, cells, GraphUndo(s.work.get_submodule(gfqn)), [], {}, [])
            s.graph_work.append(gw)
            owner = s.work.get_submodule(gfqn)
            try:
                gw.regions = [(site, e, build_region(tg.gm, site.match)) for site, e in cells]
                remap: dict = {}
                for k, (site, e, region) in enumerate(gw.regions):
                    m = site.match
                    m.x, m.h, m.c = (remap.get(n, n) for n in (m.x, m.h, m.c))
                    name = f"rnn_sparsify_cell_{k}"
                    while hasattr(owner, name):
                        name += "_"
                    old_h, old_c = m.h_out, m.c_out
                    rewrite_cell(tg.gm, m, name, region)
                    call = next(n for n in tg.gm.graph.nodes if n.op == "call_module" and n.target == name)
                    outs = sorted(call.users, key=lambda n: n.args[1])
                    remap[old_h], remap[old_c] = outs[0], outs[1]
                    owner.add_module(name, region)
                    gw.undo.added.append(name)
                    gw.targets[name] = e
                    e.__dict__["_region"] = region
                    gw.changes.append(f"hand-written cell {display_fqn(site.fqn)}[{site.node}] -> {name}")
            except Exception as err:  # noqa: BLE001 - contained: this graph's cells skipped
                gw.failed = _graph_failed(s, gw, err)


def _graph_failed(s: SparsifyState, gw: _GraphWork, err: BaseException) -> dict:
    """Undo the graph's rewrite, skip its cells; returns its dropout record."""
    gw.undo.restore()
    for _, e in gw.cells:
        _fail(e, err, s.errors)
    for site in s.sites:  # LSTMs swapped in place stay swapped (their own config), unfused
        e = s.by_site[id(site)]
        if e.fused_dropout and e.fused_dropout.get("graph") == display_fqn(gw.gfqn):
            e._sd, e.fused_dropout = s.cfg.structured_dropout, None
    return {"graph": display_fqn(gw.gfqn), "fused": False,
            "reason": f"graph rewrite failed: {type(err).__name__}: {err}"}


class FuseDropoutPass(Pass):
    """Per traced graph: a dropout feeding an LSTM's input becomes that LSTM's structured NR
    dropout (only with a StructuredDropout config, a mode-independent graph and an LSTM called
    once); the graph's forward is listed to install. Contained per graph."""

    name, requires, ensures = "fuse dropout", ("cells_rewritten", "weight_sparsity_attached"), ("dropout_fused",)

    def run(self, s: SparsifyState) -> None:
        s.pending, s.graph_rewrites, s.dropouts = [], {}, []
        calls: dict[int, int] = {}  # id(module) -> call_module nodes calling it, over every graph
        for tg in s.tr.graphs.values():
            for n in tg.gm.graph.nodes:
                if n.op == "call_module":
                    mod = tg.gm.get_submodule(n.target)
                    calls[id(mod)] = calls.get(id(mod), 0) + 1
        for gw in s.graph_work:
            if gw.failed:
                s.dropouts.append(gw.failed)
                continue
            try:
                done = _fuse_graph(s, gw, calls)
            except Exception as err:  # noqa: BLE001 - contained: this graph's cells skipped, fusions undone
                s.dropouts.append(_graph_failed(s, gw, err))
                continue
            s.dropouts.extend(done["dropouts"])
            if done["pending"] is not None:
                s.pending.append((gw.gfqn, gw.undo, gw.cells, *done["pending"]))
                s.graph_rewrites[gw.gfqn] = done["pending"][-1]


def _fuse_graph(s: SparsifyState, gw: _GraphWork, calls: dict) -> dict:
    from .fuse_dropout import find_dropout_feeds, fuse_dropout

    sd, gfqn, tg = s.cfg.structured_dropout, gw.gfqn, gw.tg
    owner = s.work.get_submodule(gfqn)
    fused: list[tuple[str, Any]] = []
    dropouts: list[dict] = []
    changes, targets = gw.changes, gw.targets

    def target_entry(node):
        if node.target in targets:
            return targets[node.target]
        return s.swapped.get(f"{gfqn}.{node.target}" if gfqn else node.target)

    def record(f, **kw):
        dropouts.append({**f.to_dict(), "target": f.target.name, "graph": display_fqn(gfqn), **kw})

    feeds, refused = find_dropout_feeds(
        tg.gm, lambda n: n.op == "call_module" and (target_entry(n) is not None or _is_lstm_call(tg.gm, n)))
    for r in refused:
        dropouts.append({**r.to_dict(), "fused": False, "graph": display_fqn(gfqn)})
    for f in feeds:
        e = target_entry(f.target)
        if e is None:
            record(f, fused=False, reason="the LSTM it feeds is skipped")
        elif sd is None:
            record(f, fused=False, reason="no StructuredDropout config given (fusing changes dropout to structured NR)")
        elif not tg.mode_independent:
            record(f, fused=False, reason=f"graph rewrite refused: {tg.mode_reason}")
        elif f.target.target not in targets and _shared_reason(tg.gm, f.target, calls) is not None:
            record(f, fused=False, reason=_shared_reason(tg.gm, f.target, calls))
        else:
            p_in = sd.p_input if sd.p_input > 0 else f.p
            e._sd = StructuredDropout(p_input=p_in, p_recurrent=sd.p_recurrent)
            e.fused_dropout = {**f.to_dict(), "p_input": p_in, "graph": display_fqn(gfqn)}
            record(f, fused=True, p_input=p_in)
            changes.append(f"removed {f.source} (p={f.p}) before {f.target.name}: fused as NR dropout p_input={p_in}")
            if f.target.target not in targets:
                mod = e.__dict__["_module"]
                gw.undo.remember(mod)
                mod.structured_dropout = e._sd
                if isinstance(mod, nn.LSTM):
                    mod.dropout = 0.0  # NR dropout replaces the inter-layer dropout
                fused.append((f.target.target, sd))
            fuse_dropout(tg.gm, f)
    for _, e, region in gw.regions:
        region.configure(e._sd, e._gs)
        e.__dict__.pop("_region", None)
    if not changes:
        return {"dropouts": dropouts, "pending": None}
    prefix = f"{gfqn}." if gfqn else ""
    tr = s.tr
    covered = [k[len(prefix):] for k, v in (*tr.inlined.items(), *tr.leaves.items()) if v == gfqn]
    return {"dropouts": dropouts, "pending": (owner, tg.gm.graph, covered, tuple(fused), changes)}


def _shared_reason(gm, node, calls: dict[int, int]) -> Optional[str]:
    """Why a dropout cannot be fused into the LSTM that ``node`` calls (None if it can):
    the fused dropout becomes the module's config, so it would apply to every call."""
    n = calls.get(id(gm.get_submodule(node.target)), 0)
    if n > 1:
        return (f"the LSTM is called {n} times; fusing would apply this dropout to every call "
                "(it is kept as written)")
    return None


def _is_lstm_call(gm, node) -> bool:
    from .trace import is_lstm_like

    try:
        return is_lstm_like(gm.get_submodule(node.target))
    except AttributeError:
        return False


class RewriteLayersPass(Pass):
    """Each captured hand-written layer: its repeated cell replaced by one shared sparse cell
    region in the recorded graph, which becomes the layer's forward in training when called
    as recorded (listed to install); eval() keeps the layer's own forward. Contained per
    layer."""

    name, requires, ensures = "rewrite layers", ("layers_captured", "planned", "dropout_fused"), ("layers_rewritten",)

    def run(self, s: SparsifyState) -> None:
        from .capture import rewrite_layers

        rewrite_layers(s)


class BackendsPass(Pass):
    """The configs applied and the layer backend the training path would take (dry: nothing
    is built) of every handled entry."""

    name, requires, ensures = "backends", ("dropout_fused", "layers_rewritten"), ("entries_final",)

    def run(self, s: SparsifyState) -> None:
        ws = s.cfg.weight_sparsity
        for site in s.sites:
            e = s.by_site[id(site)]
            if e.handling == SKIPPED:
                continue
            w = next(iter(site.module.parameters()), None)
            e.configs = [c.to_dict() for c in (e._sd, e._gs) if c is not None]
            if w is not None:
                e.backend = _backend_of(site.module, e, s.observed)
            if ws is not None:
                if e.handling == MODULE_SWAP:
                    e.configs.append(ws.to_dict())
                else:
                    e.reason += "; weight sparsity not attached (it applies to nn.LSTM/nn.LSTMCell modules)"
            e.__dict__.pop("_module", None)
        s.entries_final = True


def _backend_of(module: nn.Module, e, observed: dict) -> str:
    """The layer backend the LSTM's training path would take (dry: nothing is built), with
    the configs the report applies; hand-written cells run on the same layer backends."""
    from rnn_sparsify.kernels.layer import explain_lstm

    if not hasattr(module, "input_size"):
        return "reference"
    batch = (observed.get(id(module)) or {}).get("batch") or 1
    try:
        name, _ = explain_lstm(module, batch=batch, configs=(e._sd, e._gs))
    except Exception:  # the report must never fail on this
        return "reference"
    return name


class InstallForwardsPass(Pass):
    """Every rewritten graph becomes its module's forward (a dynamic subclass keeping class,
    attributes and state_dict), behind a ``ForwardGuard`` that runs the original forward
    when a call differs from the traced pattern."""

    name, requires, ensures = "install forwards", ("dropout_fused", "layers_rewritten"), ("installed",)

    def run(self, s: SparsifyState) -> None:
        from .rewrite import guard_for, install_graph_forward

        for _, _, _, owner, graph, covered, fused, changes, *extra in s.pending:
            guard = (extra[0] if extra else None) or guard_for(
                owner, graph, covered, fused, s.signatures.get(id(owner)), s.none_args.get(id(owner), frozenset()))
            install_graph_forward(owner, graph, guard)
            if extra and len(extra) > 1 and extra[1]:
                owner.__dict__["_rnn_sparsify_eval_original"] = True
            changes.append(guard.describe())
        s.installed = True


class VerifyPass(Pass):
    """With example inputs: the copy's eval() outputs with every installed forward against
    the same model on the original forwards; a forward that changes them is undone and
    reported."""

    name, requires, ensures = "verify", ("installed",), ("verified",)

    def run(self, s: SparsifyState) -> None:
        if s.example_inputs is not None and s.pending:
            s.verification = _verify_graph_rewrites(s)
        s.verified = True


def _verify_graph_rewrites(s: SparsifyState) -> dict:
    """Returns ``{"checked", "reverted"}`` (and ``"error"`` if the inputs failed to run)."""
    from .observe import outputs, same

    inputs = s.example_inputs if isinstance(s.example_inputs, tuple) else (s.example_inputs,)
    pending, sd = s.pending, s.cfg.structured_dropout
    owners = [p[3] for p in pending]

    def run(active: set) -> list:
        for o in owners:
            o.__dict__["_rnn_sparsify_force_original"] = id(o) not in active
        try:
            return outputs(s.work, inputs, s.example_kwargs)
        finally:
            for o in owners:
                o.__dict__.pop("_rnn_sparsify_force_original", None)

    reverted: dict[str, str] = {}
    try:
        ref = run(set())
        if same(run({id(o) for o in owners}), ref):
            return {"checked": [display_fqn(p[0]) for p in pending], "reverted": reverted}
        for gfqn, undo, cells, owner, *_ in pending:
            if same(run({id(owner)}), ref):
                continue
            why = "verification: with this rewritten forward the example inputs give other eval() outputs; undone"
            revert_graph(owner, undo)
            reverted[display_fqn(gfqn)] = why
            s.graph_rewrites.pop(gfqn, None)
            for _, e in cells:
                e.handling, e.reason, e._sd, e._gs, e.configs, e.backend = SKIPPED, why, None, None, [], None
            for dd in s.dropouts:
                if dd.get("graph") == display_fqn(gfqn) and dd.get("fused"):
                    dd["fused"], dd["reason"] = False, why
            for e in s.entries:  # LSTMs that took over one of its dropouts: unfused again
                if e.fused_dropout and e.fused_dropout.get("graph") == display_fqn(gfqn):
                    e._sd, e.fused_dropout = sd, None
                    e.configs = [sd.to_dict() if c.get("kind") == StructuredDropout.kind else c for c in e.configs]
            warnings.warn(f"rnn_sparsify: {why} ({display_fqn(gfqn)})", RuntimeWarning, stacklevel=6)
    except Exception as err:  # noqa: BLE001 - example inputs that do not run were caught earlier
        return {"checked": [], "reverted": reverted, "error": f"{type(err).__name__}: {err}"}
    return {"checked": [display_fqn(p[0]) for p in pending], "reverted": reverted}


class ReportPass(Pass):
    """Raise if every LSTM that was tried failed; otherwise build the SparsifyReport (with
    the dropouts next to LSTMs in untraceable code)."""

    name, requires, ensures = "report", ("verified", "entries_final"), ("reported",)

    def run(self, s: SparsifyState) -> None:
        from .fuse_dropout import untraced_dropouts  # next to LSTMs in untraceable code

        if s.errors and not any(e.handling != SKIPPED for e in s.entries):
            raise RuntimeError("sparsify: no LSTM could be handled: " + "; ".join(s.errors))
        s.dropouts += untraced_dropouts(s.work, s.tr.opaque, [e.fqn for e in s.entries if e.handling == MODULE_SWAP])
        s.report = SparsifyReport(
            lstms=s.entries, configs=s.cfg.to_list(), graph_rewrites=s.graph_rewrites,
            untraceable={k: v for k, v in s.tr.opaque.items()}, dropouts=s.dropouts, applied=s.applied,
            verification=s.verification,
        )
        s.report.details.update((display_fqn(k), v) for k, v in s.tr.details.items())


SPARSIFY_PASSES: tuple[type[Pass], ...] = (
    CopyPass, ObservePass, TracePass, FindPass, CaptureLayersPass, PlanPass, SwapModulesPass,
    AttachWeightSparsityPass, RewriteCellsPass, FuseDropoutPass, RewriteLayersPass, BackendsPass,
    InstallForwardsPass, VerifyPass, ReportPass,
)


def sparsify_pipeline() -> Pipeline:
    return Pipeline([p() for p in SPARSIFY_PASSES])


def run_sparsify(model, configs, filter_fn, example_inputs, applied: bool, example_kwargs=None):
    """(the rewritten copy, its report)."""
    state = SparsifyState(model=model, configs=configs, filter_fn=filter_fn, example_inputs=example_inputs,
                          example_kwargs=example_kwargs, applied=applied)
    sparsify_pipeline().run(state)
    return state.work, state.report
