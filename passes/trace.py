"""Tracing that degrades, never fails.

:func:`trace_degrading` traces a model with ``torch.fx`` where it can and keeps the rest
opaque. Rules, in order:

1. ``nn.LSTM`` / ``nn.LSTMCell`` and their subclasses are **leaves** (one ``call_module``
   node each; a subclass keeps its own ``forward``). TorchScript modules are leaves too and
   are recorded as *scripted* (their compiled code cannot be rewritten).
2. Try to trace a module. If it traces, its whole sub-tree is covered by one graph.
3. If it does not trace (``pack_padded_sequence`` on traced lengths, ``range(len(x))``,
   ``if`` on a traced value, ...), trace each child on its own (recursively), then retry the
   module with the children that failed kept as leaves. If the retry still fails, the
   module is **opaque** (with the exception text as the reason) and each child keeps its own
   result. LSTMs below an opaque module are still found later by walking ``named_modules``
   and are replaced in place (module swap).

A module's graph is only *usable for rewriting* if its forward does not branch on
``self.training``: it is traced in both modes and the two graphs are compared (functional
dropout's ``training=`` argument is made dynamic first, see :func:`dynamic_dropout_flags`).

Post-condition: every module of the model is in exactly one of ``graphs`` (a traced root),
``inlined`` (covered by an ancestor's graph), ``leaves`` (LSTM-like leaf), ``scripted`` or
``opaque``; nothing raises except a ``KeyboardInterrupt``.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "LSTM_TYPES",
    "TracedGraph",
    "TraceResult",
    "LeafTracer",
    "is_lstm_like",
    "is_scripted",
    "is_sparse_region",
    "trace_module",
    "trace_degrading",
    "dynamic_dropout_flags",
    "is_dynamic_dropout",
    "PythonState",
]

LSTM_TYPES = (nn.LSTM, nn.LSTMCell)


def is_scripted(m: nn.Module) -> bool:
    return isinstance(m, torch.jit.ScriptModule)


def is_lstm_like(m: nn.Module) -> bool:
    """An eager ``nn.LSTM`` / ``nn.LSTMCell`` (or subclass): a leaf that is swapped, not traced."""
    return isinstance(m, LSTM_TYPES) and not is_scripted(m)


def is_sparse_region(m: nn.Module) -> bool:
    """A hand-written cell rewritten by an earlier ``sparsify`` (``SparseCellRegion``)."""
    return bool(getattr(type(m), "_rnn_sparsify_leaf", False))


class LeafTracer(fx.Tracer):
    """fx tracer with LSTM modules, TorchScript modules and ``extra_leaves`` kept as leaves.

    Every node records where the user's code created it (:func:`.user_code.node_location`).
    """

    def __init__(self, extra_leaves: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves

    def create_node(self, *args, **kwargs):
        from .user_code import record_location

        return record_location(super().create_node(*args, **kwargs))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, LSTM_TYPES) or is_scripted(m) or id(m) in self.extra_leaves or is_sparse_region(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class TracedGraph:
    """One traced module: ``gm`` is its graph (traced in the module's current mode)."""

    fqn: str
    gm: fx.GraphModule
    leaves: list[str]  # fqns (relative to this module) of opaque children kept as leaves
    mode_independent: bool  # same graph in train() and eval() (rewriting is safe)
    mode_reason: str = ""


@dataclass
class TraceResult:
    graphs: dict[str, TracedGraph] = field(default_factory=dict)
    inlined: dict[str, str] = field(default_factory=dict)  # fqn -> fqn of the graph covering it
    leaves: dict[str, str] = field(default_factory=dict)  # fqn -> fqn of the graph calling it
    opaque: dict[str, str] = field(default_factory=dict)  # fqn -> why it could not be traced (user terms)
    details: dict[str, str] = field(default_factory=dict)  # fqn -> the raw tracing error
    scripted: dict[str, str] = field(default_factory=dict)  # fqn -> reason

    def graph_of(self, fqn: str) -> Optional[TracedGraph]:
        """The traced graph whose code contains (inlines or calls) module ``fqn``."""
        owner = self.inlined.get(fqn, self.leaves.get(fqn))
        if owner is None and fqn in self.graphs:
            owner = fqn
        return self.graphs.get(owner) if owner is not None else None

    def nearest_opaque(self, fqn: str) -> Optional[tuple[str, str]]:
        """The closest opaque ancestor of ``fqn`` and its reason (None if none)."""
        parts = fqn.split(".") if fqn else []
        for i in range(len(parts) - 1, -1, -1):
            anc = ".".join(parts[:i])
            if anc in self.opaque:
                return anc, self.opaque[anc]
        return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _short(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def trace_module(module: nn.Module, extra_leaves: frozenset[int] = frozenset(),
                 concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """Trace ``module`` with :class:`LeafTracer`; raises whatever tracing raises.
    ``concrete_args`` (e.g. ``{"hx": None}``) specialises those parameters."""
    tracer = LeafTracer(extra_leaves)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tracer.trace(module, concrete_args=concrete_args or None)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


_DROPOUT_FNS = (F.dropout, torch.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout)


def _dropout_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _DROPOUT_FNS]


def _training_arg(node: fx.Node):
    return node.args[2] if len(node.args) >= 3 else node.kwargs.get("training", True)


def dynamic_dropout_flags(gm: fx.GraphModule, other: Optional[fx.GraphModule] = None) -> int:
    """Make ``F.dropout(x, p, training=self.training)`` read ``self.training`` at run time.

    Tracing bakes ``training=self.training`` in as a constant; a rewritten forward must keep
    switching with ``train()``/``eval()``. A *literal* flag (``training=False``, or the default
    ``True`` of ``F.dropout``) must stay as written. The two cannot be told apart in one
    trace, so ``other`` is the same module traced in the other mode: a dropout whose flag
    differs between the two traces reads ``self.training``; one whose flag is the same is a
    literal and is left alone. Without ``other`` every flag is made dynamic (tests only).
    Returns the number of nodes changed (in ``gm`` and, identically, in ``other``).

    Before: ``dropout = F.dropout(x, p=0.2, training=True)``   (traced from ``self.training``)
    After:  ``training = self.training; dropout = F.dropout(x, p=0.2, training=training)``
    """
    nodes = _dropout_nodes(gm)
    if other is not None:
        theirs = _dropout_nodes(other)
        if len(theirs) != len(nodes):
            return 0  # the graphs differ anyway: not mode independent, never rewritten
        dynamic = [k for k, (a, b) in enumerate(zip(nodes, theirs)) if _training_arg(a) != _training_arg(b)]
    else:
        dynamic = list(range(len(nodes)))
    changed = 0
    for g_mod in (gm, other) if other is not None else (gm,):
        todo = [n for k, n in enumerate(_dropout_nodes(g_mod)) if k in dynamic]
        if not todo:
            continue
        g = g_mod.graph
        first = next(n for n in g.nodes if n.op != "placeholder")
        with g.inserting_before(first), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # get_attr of a bool attribute is intended
            flag = g.get_attr("training")
        for node in todo:
            if len(node.args) >= 3:
                node.args = (*node.args[:2], flag, *node.args[3:])
            else:
                node.kwargs = {**node.kwargs, "training": flag}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # get_attr of a bool is intended
            g.lint()
        g_mod.recompile()
        changed = len(todo)
    return changed


def is_dynamic_dropout(node: fx.Node) -> bool:
    """A functional dropout whose ``training`` flag reads ``self.training`` at run time."""
    t = _training_arg(node)
    return isinstance(t, fx.Node) and t.op == "get_attr" and t.target == "training"


# ---------------------------------------------------------------------------------------
# Python state of the modules: tracing must not change it
_PLAIN = (bool, int, float, str, type(None))


class PythonState:
    """A snapshot of every module's instance attributes (and the contents of plain
    lists/dicts/sets held in them) and buffers; :meth:`changed` names what differs now,
    :meth:`restore` puts it back. Tracing runs a forward's Python code, so an attribute
    update there (``self.calls += 1``) would run at trace time only: such a module is not
    rewritten, and the state is restored."""

    def __init__(self, root: nn.Module) -> None:
        self.mods = []
        for name, m in root.named_modules(remove_duplicate=True):
            d = dict(m.__dict__)
            contents = {k: (type(v)(v) if type(v) in (list, dict, set) else None) for k, v in d.items()}
            bufs = {k: b.detach().clone() for k, b in m._buffers.items() if b is not None}
            self.mods.append((name, m, d, contents, bufs))

    @staticmethod
    def _same(a, b) -> bool:
        if type(a) in (list, set, dict) and type(b) is type(a):
            if len(a) != len(b):
                return False
            if type(a) is dict:
                return all(k in b and a[k] is b[k] for k in a)
            if type(a) is set:
                return a == b
            return all(x is y for x, y in zip(a, b))
        return a is b or (isinstance(a, _PLAIN) and type(a) is type(b) and a == b)

    def changed(self) -> list[str]:
        out = []
        for name, m, d, contents, bufs in self.mods:
            now = m.__dict__
            for k in set(d) | set(now):
                if k not in d or k not in now or now[k] is not d[k] and not self._same(d[k], now[k]):
                    out.append(f"{name}.{k}" if name else k)
                elif contents[k] is not None and not self._same(contents[k], now[k]):
                    out.append(f"{name}.{k}" if name else k)
            for k, b in bufs.items():
                cur = m._buffers.get(k)
                if cur is None or cur.shape != b.shape or not torch.equal(cur.detach(), b):
                    out.append(f"{name}.{k}" if name else k)
        return sorted(set(out))

    @torch.no_grad()
    def restore(self) -> None:
        for _, m, d, contents, bufs in self.mods:
            m.__dict__.clear()
            m.__dict__.update(d)
            for k, c in contents.items():
                if c is not None:
                    v = d[k]
                    v.clear()
                    v.update(c) if type(v) is not list else v.extend(c)
            for k, b in bufs.items():
                cur = m._buffers.get(k)
                if cur is not None and cur.shape == b.shape:
                    cur.copy_(b)


def _check_mode_independent(module: nn.Module, gm: fx.GraphModule, leaves: frozenset[int],
                            concrete_args: Optional[dict] = None) -> tuple[bool, str]:
    was = module.training
    try:
        module.train(not was)
        other = trace_module(module, leaves, concrete_args)
    except Exception as e:  # traced in one mode, not in the other
        return False, f"forward traces only in {'train' if was else 'eval'} mode ({_short(e)})"
    finally:
        module.train(was)
    dynamic_dropout_flags(gm, other)
    if other.code != gm.code:
        from .user_code import node_location

        where = ""
        for a, b in zip(list(gm.graph.nodes) + [None], list(other.graph.nodes) + [None]):
            if a is None or b is None or (a.op, a.target) != (b.op, b.target):
                loc = node_location(a) if a is not None else (node_location(b) if b is not None else "")
                where = f" (first difference at {loc})" if loc else ""
                break
        return False, (f"forward of {type(module).__name__} branches on self.training (train and eval graphs "
                       f"differ{where}), so rewriting it could change one of the two modes. What you can do: pass "
                       "the mode as data, e.g. F.dropout(x, p, self.training) or nn.Dropout, instead of "
                       "`if self.training:`")
    return True, ""


def trace_degrading(model: nn.Module, none_args: Optional[dict[int, frozenset]] = None) -> TraceResult:
    """Trace ``model`` as far as it goes (see module docstring). Never raises on bad code.

    A module whose forward changes Python state while traced (``self.calls += 1``, a list
    append, a buffer written in place) is opaque: a graph would run that code at trace time
    only. The state is restored, so ``model`` leaves this function as it came in.

    ``none_args`` (id of a module -> parameter names) are traced as None: the parameters the
    module's ``example_inputs`` calls never passed (see ``ForwardGuard``)."""
    res = TraceResult()
    none_args = none_args or {}

    def concrete(module: nn.Module) -> Optional[dict]:
        names = none_args.get(id(module))
        return {n: None for n in names} if names else None

    def try_trace(module: nn.Module, fqn: str, leaves: frozenset[int]) -> Optional[fx.GraphModule]:
        state = PythonState(module)
        try:
            gm = trace_module(module, leaves, concrete(module))
        except Exception as e:
            state.restore()
            from .user_code import explain_untraceable

            res.opaque[fqn] = explain_untraceable(module, e)
            res.details[fqn] = _short(e, limit=2000)
            return None
        changed = state.changed()
        if changed:
            state.restore()
            res.opaque[fqn] = ("forward changes Python state while it runs (" + ", ".join(changed[:3])
                               + "): a traced graph would not repeat that")
            return None
        return gm

    def record(module: nn.Module, fqn: str, gm: fx.GraphModule, leaves: frozenset[int]) -> None:
        res.opaque.pop(fqn, None)
        res.details.pop(fqn, None)
        state = PythonState(module)
        ok, why = _check_mode_independent(module, gm, leaves, concrete(module))
        state.restore()
        leaf_names = [name for name, sub in module.named_modules() if name and id(sub) in leaves]
        # assign coverage: leaves stop the walk into their subtree
        def walk(m: nn.Module, prefix: str) -> None:
            for name, child in m.named_children():
                full = _join(prefix, name)
                if is_scripted(child):
                    res.leaves[full] = fqn
                    res.scripted.setdefault(full, "TorchScript module: compiled code cannot be traced or rewritten")
                elif is_lstm_like(child) or id(child) in leaves:
                    res.leaves[full] = fqn
                    res.inlined.pop(full, None)
                    res.graphs.pop(full, None)
                else:
                    res.inlined[full] = fqn
                    res.graphs.pop(full, None)
                    res.opaque.pop(full, None)
                    res.details.pop(full, None)
                    walk(child, full)

        walk(module, fqn)
        res.graphs[fqn] = TracedGraph(fqn, gm, leaf_names, ok, why)

    def visit(module: nn.Module, fqn: str) -> bool:
        """True if ``module`` is covered by a graph rooted at it."""
        if is_scripted(module):
            res.scripted[fqn] = "TorchScript module: compiled code cannot be traced or rewritten"
            return False
        if is_lstm_like(module):
            return False  # found and swapped by find_lstm; nothing to trace
        gm = try_trace(module, fqn, frozenset())
        if gm is not None:
            record(module, fqn, gm, frozenset())
            return True
        failed: set[int] = set()
        for name, child in module.named_children():
            if is_lstm_like(child) or is_scripted(child):
                if is_scripted(child):
                    res.scripted[_join(fqn, name)] = "TorchScript module: compiled code cannot be traced or rewritten"
                continue
            if not visit(child, _join(fqn, name)):
                failed.add(id(child))
        if failed:
            leaves = frozenset(failed)
            gm = try_trace(module, fqn, leaves)
            if gm is not None:
                record(module, fqn, gm, leaves)
                return True
        return False

    visit(model, "")
    return res


# operator/function tables shared by the passes -------------------------------------------
ADD_TARGETS = (operator.add, torch.add, operator.iadd)
MUL_TARGETS = (operator.mul, torch.mul, operator.imul)
