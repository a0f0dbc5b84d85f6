"""Hand-written LSTM layers in code torch.fx cannot trace (issue 10, item 4).

A layer such as::

    gated = self.x2g(x)
    for g in gated.unbind(0):                   # a Python time loop: fx cannot trace it
        g = self.g_norm(g + self.p2g(h))
        i, f, u, o = g.chunk(4, 1)
        c = self.c_norm(f.sigmoid() * c + i.sigmoid() * u.tanh())
        h = o.sigmoid() * c.tanh()

is found by :func:`~.find_lstm.probable_layers` (its source reads like one). With example
inputs, :func:`capture_layers` runs it once more on the arguments it was called with (recorded
by the observe pass) under a recording :class:`torch.overrides.TorchFunctionMode`: every torch
call becomes a node of an fx graph (parameters and buffers as ``get_attr``, the arguments as
placeholders), so the Python loop is unrolled, one cell per time step. Two normalisations
follow: a projection of the whole sequence taken apart per step (``linear(X).unbind(0)[t]``,
``linear(X)[t]``) becomes the projection of the step (``linear(X.unbind(0)[t])``), so that the
cell's input projection is visible; then the networkx matcher of :mod:`.match_cell` finds the
cell at every step (any gate order, chunk/split/slicing, LayerNorm on gates and cell). The
layer is accepted when every step is the same cell (same parameters, gate order,
normalisation), nothing else in the recording is refused (below), and the recorded graph with
the cells on a sparse cell region gives the layer's outputs on the example arguments.

:func:`rewrite_layers` then gives the layer a new forward: in training, the recorded graph
with every step's cell replaced by one shared ``SparseCellRegion`` (structured dropout as in
``SparseLSTMCell``/gather-K, gate-gradient sparsity for cells without normalisation), while
the call matches the recording (same argument shapes, dtypes, devices and non-tensor values;
:class:`LayerGuard`); otherwise, and always in ``eval()``, the layer's own forward. Parameters,
``state_dict`` keys, class, hooks and attributes are the layer's own (the region holds no
parameters).

Refused, with the reason in the report: no example inputs (reported where the layer is, with
what would let sparsify handle it); a layer the example inputs never call; data-dependent
Python control flow or values inside the layer (``bool(tensor)``, ``.item()``, ``.tolist()``);
random ops and dropout (the recording is made in eval()); in-place ops; tensors that are neither
arguments, parameters, buffers nor computed from them; a step that is not the same LSTM cell;
no cell at all; outputs of the recorded graph that differ from the layer's.
"""
from __future__ import annotations

import inspect
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from rnn_sparsify.report import GRAPH_REWRITE, SKIPPED, display_fqn

__all__ = ["CapturedLayer", "LayerGuard", "record_layer", "capture_layers", "rewrite_layers", "LAYER_KIND"]

LAYER_KIND = "hand-written LSTM layer"

_DATA_DEPENDENT = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "nonzero",
                   "__len__", "__array__", "__complex__"}
_RANDOM = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli",
           "multinomial", "normal", "normal_", "uniform_", "dropout", "alpha_dropout", "feature_alpha_dropout",
           "dropout1d", "dropout2d", "dropout3d", "rrelu", "poisson", "exponential_", "geometric_", "cauchy_",
           "log_normal_", "random_", "bernoulli_"}
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_BINARY = {"__mul__": operator.mul, "__rmul__": operator.mul, "__add__": operator.add, "__radd__": operator.add,
           "__sub__": operator.sub, "__truediv__": operator.truediv, "__matmul__": operator.matmul,
           "__neg__": operator.neg, "__getitem__": operator.getitem}


class CaptureRefused(Exception):
    """The layer cannot be captured; the message says why."""


# ---------------------------------------------------------------------------------------
# the recording trace
class _Recorder(TorchFunctionMode):
    """Every torch call made while active becomes a node of ``self.graph``."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.env: dict[int, fx.Node] = {}
        self.keep: list = []  # every recorded tensor, alive, so that ids stay unique
        self.problem: Optional[str] = None
        self.attrs = {id(t): name for name, t in (*root.named_parameters(), *root.named_buffers())}

    def bind(self, value: Any, node: fx.Node) -> None:
        if isinstance(value, torch.Tensor):
            self.env[id(value)] = node
            self.keep.append(value)
        elif isinstance(value, (tuple, list)):
            for k, v in enumerate(value):
                if isinstance(v, torch.Tensor):
                    self.bind(v, self.graph.call_function(operator.getitem, (node, k)))

    def arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            node = self.env.get(id(a))
            if node is None:
                name = self.attrs.get(id(a))
                if name is None:
                    raise CaptureRefused("it uses a tensor that is neither an argument, a parameter or buffer, nor "
                                         f"computed from them (shape {tuple(a.shape)}: a constant made outside torch "
                                         "calls)")
                return self.graph.get_attr(name)  # one node per use, as fx tracing makes them
            return node
        if isinstance(a, (tuple, list)) and not hasattr(a, "_fields"):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.problem is not None:
            return out
        try:
            self._record(func, args, kwargs, out)
        except CaptureRefused as e:
            self.problem = str(e)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", str(func))
        owner = getattr(func, "__self__", None)
        if name == "__get__" and owner is not None:  # a Tensor property (.shape, .T, .data)
            name = getattr(owner, "__name__", "")
            if not isinstance(out, torch.Tensor):
                return  # metadata: its value is baked into the recording
            self.bind(out, self.graph.call_function(getattr, (self.arg(args[0]), name)))
            return
        if name in _DATA_DEPENDENT:
            raise CaptureRefused(f"data-dependent Python code inside the layer ({name} of a tensor): the recording "
                                 "would bake one branch or value")
        if name in _RANDOM:
            raise CaptureRefused(f"random op {name} inside the layer (recorded in eval(), it would not replay in "
                                 "training)")
        if not _has_tensor(out):
            return  # size(), dim(), is_floating_point(): baked
        is_method = getattr(func, "__qualname__", "").startswith(("TensorBase.", "Tensor."))
        if is_method and (name.endswith("_") and not name.endswith("__") or name.startswith("__i")
                          or name == "__setitem__"):
            raise CaptureRefused(f"in-place op {name} inside the layer")
        a, kw = self.arg(tuple(args)), self.arg(dict(kwargs))
        if is_method and name in _BINARY:
            fn = _BINARY[name]
            node = self.graph.call_function(fn, (a[1], a[0]) if name.startswith("__r") else a, kw)
        elif is_method:
            node = self.graph.call_method(name, a, kw)
        else:
            node = self.graph.call_function(func, a, kw)
        self.bind(out, node)


def _has_tensor(o: Any) -> bool:
    if isinstance(o, torch.Tensor):
        return True
    if isinstance(o, (tuple, list)):
        return any(isinstance(x, torch.Tensor) for x in o)
    return False


def _flat_out(rec: _Recorder, o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return rec.arg(o)
    if isinstance(o, (tuple, list)) and not hasattr(o, "_fields"):
        return type(o)(_flat_out(rec, x) for x in o)
    if isinstance(o, dict):
        return {k: _flat_out(rec, v) for k, v in o.items()}
    if o is None or isinstance(o, (int, float, bool, str)):
        return o
    raise CaptureRefused(f"it returns a {type(o).__name__}, which the recording cannot rebuild")


def _meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device)
    if v is None or isinstance(v, (bool, int, float, str)):
        return ("value", type(v), v)
    raise CaptureRefused(f"it is called with a {type(v).__name__} argument (only tensors and plain values are "
                         "recorded)")


@dataclass(frozen=True)
class LayerGuard:
    """The call pattern the recording assumed: every forward parameter (defaults applied),
    tensors with the recorded shape, dtype and device, other values equal. A call that differs
    runs the layer's own forward (a one-time warning says why). ``eval()`` always does."""

    params: tuple[str, ...]
    metas: tuple[Any, ...]
    fused: tuple = ()

    def bind(self, owner: nn.Module, args: tuple, kwargs: dict) -> tuple[Optional[str], tuple]:
        try:
            b = inspect.signature(owner._rnn_sparsify_base.forward).bind(owner, *args, **kwargs)
        except TypeError as e:
            return f"arguments do not bind to forward: {e}", ()
        b.apply_defaults()
        values = tuple(b.arguments[p] for p in self.params)
        for p, v, m in zip(self.params, values, self.metas):
            try:
                now = _meta(v)
            except CaptureRefused:
                return f"argument {p!r} is a {type(v).__name__}", ()
            if now != m:
                what = (f"shape {list(now[1])}" if now[0] == "tensor" and m[0] == "tensor" else repr(v))
                was = f"shape {list(m[1])}" if m[0] == "tensor" else repr(m[2])
                return (f"argument {p!r} has {what}; the layer was captured (its loop unrolled) with {was}"), ()
        return None, values

    def describe(self) -> str:
        return ("guarded: in training runs the captured graph only when called with the captured shapes "
                f"({', '.join(self.params)}); otherwise, and in eval(), the layer's own forward")


def record_layer(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, LayerGuard]:
    """Run ``layer`` on ``(args, kwargs)`` in eval() under no_grad, recording every torch call;
    returns the recorded graph (rooted at ``layer``) and the guard of its call pattern."""
    bad = [n for n, m in layer.named_modules() if isinstance(m, _MODE_DEPENDENT)]
    if bad:
        raise CaptureRefused(f"it holds {type(layer.get_submodule(bad[0])).__name__} {bad[0]!r}, whose behaviour "
                             "depends on train/eval mode (the recording is made in eval())")
    sig = inspect.signature(type(layer).forward)
    try:
        b = sig.bind(layer, *args, **kwargs)
    except TypeError as e:
        raise CaptureRefused(f"its recorded arguments do not bind to its forward: {e}") from e
    b.apply_defaults()
    params = tuple(n for n in b.arguments if n != next(iter(sig.parameters)))
    kinds = {n: p.kind for n, p in sig.parameters.items()}
    if any(kinds[n] in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for n in params):
        raise CaptureRefused("its forward takes *args/**kwargs")
    metas = tuple(_meta(b.arguments[n]) for n in params)
    rec = _Recorder(layer)
    for n in params:
        node = rec.graph.placeholder(n)
        v = b.arguments[n]
        if isinstance(v, torch.Tensor):
            rec.env[id(v)] = node
            rec.keep.append(v)
    from .trace import PythonState

    state = PythonState(layer)
    modes = {m: m.training for m in layer.modules()}
    try:
        layer.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rec:
                out = type(layer).forward(layer, *args, **kwargs)
    except CaptureRefused:
        raise
    except Exception as e:  # noqa: BLE001 - the layer's own error on its recorded arguments
        raise CaptureRefused(f"running it on its recorded arguments failed: {type(e).__name__}: {e}") from e
    finally:
        for m, t in modes.items():
            m.training = t
        state.restore()
    if rec.problem:
        raise CaptureRefused(rec.problem)
    rec.graph.output(_flat_out(rec, out))
    rec.graph.eliminate_dead_code()
    gm = fx.GraphModule(layer, rec.graph, type(layer).__name__)
    return gm, LayerGuard(params, metas), out


# ---------------------------------------------------------------------------------------
# normalisation: projection of the whole sequence, taken apart per step -> per-step projection
def _is_linear(n: Any) -> bool:
    import torch.nn.functional as F

    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is F.linear and len(n.users) >= 1


def push_projections_into_steps(gm: fx.GraphModule) -> int:
    """``linear(X).unbind(0)[t]`` / ``linear(X)[t]`` (t an int) -> ``linear(X.unbind(0)[t])``;
    returns how many step slices were rewritten."""
    import torch.nn.functional as F

    g = gm.graph
    done = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not operator.getitem or not isinstance(n.args[1], int):
            continue
        src = n.args[0]
        if isinstance(src, fx.Node) and src.op == "call_method" and src.target == "unbind" and \
                (src.args[1:] in ((), (0,)) and src.kwargs.get("dim", 0) == 0) and _is_linear(src.args[0]):
            lin = src.args[0]
        elif _is_linear(src):
            lin = src
        else:
            continue
        X = lin.args[0]
        if not isinstance(X, fx.Node):
            continue
        with g.inserting_before(n):
            xs = g.call_function(operator.getitem, (X, n.args[1]))
            own = [g.get_attr(a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else a
                   for a in lin.args[1:]]  # one get_attr per step, as every step's cell owns its nodes
            new = g.call_function(F.linear, (xs, *own), dict(lin.kwargs))
        n.replace_all_uses_with(new)
        g.erase_node(n)
        done += 1
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return done


# ---------------------------------------------------------------------------------------
@dataclass
class CapturedLayer:
    """A hand-written layer captured by running it, and what became of it."""

    fqn: str
    module: nn.Module
    gm: Optional[fx.GraphModule] = None
    guard: Optional[LayerGuard] = None
    matches: list = field(default_factory=list)
    refusal: Optional[str] = None
    done: bool = False

    def describe(self) -> str:
        return (f"hand-written layer captured by running it on the example inputs: {len(self.matches)} time steps "
                f"unrolled, the same cell at every step; in training it runs the captured graph with the cell on "
                f"the sparse path when called with the captured shapes, else (and in eval()) its own forward")


def _same_cell(a, b) -> bool:
    return (a.gate_order == b.gate_order and a.input_size == b.input_size and a.hidden_size == b.hidden_size
            and [(p.weight, p.bias, p.parts) for p in a.projections] == [(p.weight, p.bias, p.parts)
                                                                         for p in b.projections]
            and a.extra_biases == b.extra_biases and len(a.norms) == len(b.norms))


def _match_steps(gm: fx.GraphModule):
    """Every step's cell (two rounds: steps where h is ambiguous use the recurrent weight the
    other steps showed)."""
    from .match_cell import match_lstm_cells

    matches, refused = match_lstm_cells(gm)
    if refused and matches:
        rec = {p.weight for m in matches for p in m.projections if p.parts == ["h"]}
        if rec:
            matches, refused = match_lstm_cells(gm, recurrent_weights=rec)
    return matches, refused


def capture_one(layer: nn.Module, args: tuple, kwargs: dict) -> CapturedLayer:
    cl = CapturedLayer("", layer)
    try:
        gm, guard, out = record_layer(layer, args, kwargs)
        push_projections_into_steps(gm)
        matches, refused = _match_steps(gm)
        if refused:
            r = refused[0]
            raise CaptureRefused(f"{len(refused)} of the unrolled steps {'is' if len(refused) == 1 else 'are'} not "
                                 f"an LSTM cell the matcher accepts (first: {r.anchor}: {r.reason})")
        if not matches:
            raise CaptureRefused("no LSTM cell (sigmoid gates i, f, o, tanh g, c' = f*c + i*g, h' = o*tanh(c')) "
                                 "in the recorded steps")
        odd = [m for m in matches[1:] if not _same_cell(matches[0], m)]
        if odd:
            raise CaptureRefused(f"the unrolled steps are not one repeated cell ({odd[0].h_out.name} differs from "
                                 f"{matches[0].h_out.name}: {odd[0].describe()} vs {matches[0].describe()})")
        if any(m.x.op == "placeholder" and m.h.op == "placeholder" for m in matches) and len(matches) == 1:
            pass  # a single step: a cell module, not a loop; still fine
        cl.gm, cl.guard, cl.matches = gm, guard, matches
    except CaptureRefused as e:
        cl.refusal = str(e)
    return cl


def capture_layers(s) -> list[CapturedLayer]:
    """The capture pass: every probable hand-written layer of ``s.sites`` is captured with
    the arguments of its first call, or its refusal made precise."""
    from .find_lstm import PROBABLE_LAYER

    layers = []
    for site in s.sites:
        if site.kind != PROBABLE_LAYER:
            continue
        e = s.by_site[id(site)]
        call = s.first_calls.get(id(site.module))
        if s.example_inputs is None and s.example_kwargs is None:
            site.refusal += ("; pass example_inputs= (and example_kwargs=) to sparsify so that it can capture the "
                             "layer by running it")
            continue
        if call is None:
            site.refusal = ("its forward reads like a hand-written LSTM layer, in code torch.fx cannot trace, but the "
                            "example inputs never call it, so it could not be captured by running it")
            continue
        cl = capture_one(site.module, *call)
        cl.fqn = site.fqn
        if cl.refusal is not None:
            site.refusal = (f"hand-written LSTM layer in code torch.fx cannot trace, captured by running it on the "
                            f"example inputs but not rewritten: {cl.refusal}")
            e.reason = site.refusal
            cl.done = True
            layers.append(cl)
            continue
        m = cl.matches[0]
        site.kind = e.kind = LAYER_KIND
        site.shapes = e.shapes = {"input_size": m.input_size, "hidden_size": m.hidden_size,
                                  "gate_order": m.gate_order, "normalisation": m.norms}
        site.match, site.layer, site.refusal, site.node = m, cl, None, m.h_out.name
        e.node = None
        site.location = e.location = f"{site.location}; captured by running it ({len(cl.matches)} steps)"
        layers.append(cl)
    return layers


def rewrite_layers(s) -> None:
    """The rewrite-layers pass: each captured layer planned for a graph rewrite gets its cells
    replaced by one shared region; its forward is listed to install (eval: its own forward).
    The recorded graph with the region must give the layer's outputs on the example
    arguments, else the layer is skipped with the difference."""
    from .rewrite import build_region, rewrite_cell
    from .undo import GraphUndo

    for site in s.sites:
        cl = getattr(site, "layer", None)
        if cl is None or cl.done:
            continue
        e = s.by_site[id(site)]
        cl.done = True
        if e.handling != GRAPH_REWRITE:
            continue
        owner = cl.module
        undo = GraphUndo(owner)
        try:
            gm, first = cl.gm, cl.matches[0]
            region = build_region(gm, first)
            name = "rnn_sparsify_cell_0"
            while hasattr(owner, name):
                name += "_"
            remap: dict = {}
            from .rewrite import _cell_params

            for m in cl.matches:
                if _cell_params(gm, m) != region.param_targets:
                    raise CaptureRefused(f"step {m.h_out.name} uses other parameters than the first step")
                m.x, m.h, m.c = (remap.get(n, n) for n in (m.x, m.h, m.c))
                old_h, old_c = m.h_out, m.c_out
                rewrite_cell(gm, m, name, region)
                call = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name][-1]
                outs = sorted(call.users, key=lambda n: n.args[1])
                remap[old_h], remap[old_c] = outs[0], outs[1]
            region.configure(e._sd, e._gs)
            owner.add_module(name, region)
            undo.added.append(name)
            _check_outputs(owner, gm, s.first_calls[id(owner)])
        except Exception as err:  # noqa: BLE001 - contained: the layer stays as written
            undo.restore()
            why = (f"hand-written LSTM layer captured by running it, but not rewritten: {type(err).__name__}: {err}"
                   if not isinstance(err, CaptureRefused) else
                   f"hand-written LSTM layer captured by running it, but not rewritten: {err}")
            e.handling, e.reason, e._sd, e._gs = SKIPPED, why, None, None
            continue
        changes = [f"hand-written LSTM layer {display_fqn(site.fqn)} ({len(cl.matches)} steps) -> {name} at every step"]
        s.pending.append((site.fqn, undo, [(site, e)], owner, gm.graph, [], (), changes, cl.guard, True))
        s.graph_rewrites[site.fqn] = changes


def _check_outputs(owner: nn.Module, gm: fx.GraphModule, call) -> None:
    """The rewritten recording (region on its dense path, eval()) against the layer's own
    forward on the recorded arguments: allclose (the per-step input projection may round
    differently from the whole-sequence one)."""
    from .observe import outputs

    args, kwargs = call
    modes = {m: m.training for m in owner.modules()}
    try:
        owner.eval()
        b = inspect.signature(type(owner).forward).bind(owner, *args, **kwargs)
        b.apply_defaults()
        with torch.no_grad():
            mine = gm(*list(b.arguments.values())[1:])
    finally:
        for m, t in modes.items():
            m.training = t
    ref = outputs(owner, tuple(args), kwargs)

    def flat(o):
        if isinstance(o, torch.Tensor):
            return [o]
        if isinstance(o, (tuple, list)):
            return [t for x in o for t in flat(x)]
        if isinstance(o, dict):
            return [t for k in sorted(o, key=str) for t in flat(o[k])]
        return []

    a = flat(mine)
    if len(a) != len(ref) or not all(x.shape == y.shape and torch.allclose(x, y, atol=1e-5, rtol=1e-5)
                                     for x, y in zip(a, ref)):
        raise CaptureRefused("the captured graph's outputs differ from the layer's own on the example inputs")
