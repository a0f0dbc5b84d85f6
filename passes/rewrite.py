"""Rewrites: hand-written cell -> sparse cell region, module swaps, installing a new forward.

Three mechanisms, all keeping the user's classes, parameter names and ``state_dict`` keys:

* :func:`rewrite_cell` replaces a matched hand-written cell (see :mod:`.match_cell`) in a
  traced graph by one ``call_module`` to a parameter-free :class:`SparseCellRegion` that
  receives the cell's parameters as inputs (so no parameter moves or is renamed)::

      Before                                   After
      ih = self.cell.ih(x)                     w0 = self.cell.ih.weight   (get_attr)
      hh = self.cell.hh(h)                     ...
      add = ih + hh                            region = self.rnn_sparsify_cell_0(x, h, c, w0, b0, w1, b1)
      i, f, g, o = add.chunk(4, 1)             h_new = region[0]
      ... 3 sigmoid, 2 tanh, 3 mul, 1 add      c_new = region[1]
      return (mul_2, add_1)                    return (h_new, c_new)

  In ``eval()`` (or with nothing sparse active) the region runs the extracted original
  subgraph: the same ops on the same tensors, so the numbers are the original ones. In
  training it runs :class:`~rnn_sparsify.modules.SparseLSTMCell` on the cell's weights
  rearranged into PyTorch's ``(i, f, g, o)`` layout (cells without normalisation), or, for
  normalised cells, the original subgraph with structured dropout applied as gather-K (only
  the kept columns of ``x``/``h`` and of the weights enter the GEMMs).
* :func:`swap_lstm` re-classes an ``nn.LSTM``/``nn.LSTMCell`` in place as
  ``SparseLSTM``/``SparseLSTMCell`` (same object: hooks, attributes, tied weights,
  ``requires_grad`` and every other reference to it are kept).
  A user *subclass* keeps its own ``forward``: its class becomes
  ``type("Sparse<Name>", (UserClass, SparseLSTM))`` whose MRO is
  ``Sparse<Name> -> UserClass -> SparseLSTM -> SparseMixin -> nn.LSTM``, so the user's
  ``super().forward(...)`` reaches ``SparseLSTM.forward``.
* :func:`install_graph_forward` gives a module the forward of a rewritten graph, keeping
  its class (a dynamic subclass), methods, attributes and ``state_dict``.

Dynamic classes are rebuilt on unpickling from ``(base class, kind)`` (``__reduce_ex__``),
so ``torch.save``/``torch.load`` and ``copy.deepcopy`` work without registering names.
"""
from __future__ import annotations

import functools
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from rnn_sparsify.config import GateGradientSparsity, StructuredDropout, kept_count
from rnn_sparsify.modules import SparseLSTM, SparseLSTMCell, check_configs, SparseMixin

from .match_cell import CellMatch, Projection, _NORM_MODULES

__all__ = [
    "SparseCellRegion",
    "extract_cell",
    "rewrite_cell",
    "swap_lstm",
    "install_graph_forward",
    "dynamic_class",
    "base_forward_problem",
    "ForwardGuard",
    "guard_for",
    "forward_params",
]


# ---------------------------------------------------------------------------------------
# dynamic classes
class _Rebuildable:
    """Pickles as (base class, kind) + state; the dynamic class is rebuilt on load."""

    _rnn_sparsify_base: type
    _rnn_sparsify_kind: str

    def __reduce_ex__(self, protocol):
        return (_rebuild, (self._rnn_sparsify_base, self._rnn_sparsify_kind), self.__getstate__())

    def __getstate__(self):
        return dict(super().__getstate__())  # RNNBase drops its weakrefs here


_MISSING = object()


@dataclass(frozen=True)
class ForwardGuard:
    """What a traced graph assumed, checked on every call of the installed forward.

    * ``params``: the forward's parameters in order (``()`` when it takes ``*args`` or
      ``**kwargs``: then no argument is checked). ``nones``: those traced as None because the
      ``example_inputs`` never passed them (fx specialises them: ``if hx is None:`` took the
      "None" branch); every other parameter was traced as given (fx traces an argument as a
      tensor, so ``if hx is None:`` took the "given" branch) and must be given, not None.
    * ``types``: ``(parameter, type)`` for the parameters the ``example_inputs`` passed with
      one type only (``isinstance(x, PackedSequence)`` is traced as False).
    * ``attrs``: ``(module path relative to the owner, attribute, value)`` of every plain
      (bool/int/float/str/None) attribute of the owner and of the modules its graph inlines
      or calls, as they were when traced: a ``use_head`` flag read by an ``if`` was baked in.
    * ``fused``: ``(module path, StructuredDropout without the fused dropout)`` of LSTMs that
      took over a dropout of this graph; the original forward runs that dropout itself.

    When a check fails the original forward runs instead (a one-time warning says why): the
    same numbers as the original model, only the graph's rewrites (hand-written cells on the
    sparse path, dropout fusion) are lost for that call.
    """

    params: tuple[str, ...]
    attrs: tuple[tuple[str, str, Any], ...]
    fused: tuple[tuple[str, Any], ...] = ()
    types: tuple[tuple[str, type], ...] = ()
    nones: frozenset = frozenset()

    def bind(self, owner: nn.Module, args: tuple, kwargs: dict) -> tuple[Optional[str], tuple]:
        """(why the graph does not apply, or None; the arguments in ``params`` order)."""
        ordered = args
        if self.params:
            if len(args) > len(self.params):
                return f"called with {len(args)} positional arguments, traced with {len(self.params)}", ()
            given = dict(zip(self.params, args))
            for k, v in kwargs.items():
                if k not in self.params or k in given:
                    return f"unexpected or repeated keyword argument {k!r}", ()
                given[k] = v
            for name in self.params:
                value = given.get(name)
                if name in self.nones:
                    if value is not None:
                        return (f"argument {name!r} is given; the example inputs never passed it and the graph "
                                "was traced with it None"), ()
                elif value is None:
                    how = "None" if name in given else "not given"
                    return f"argument {name!r} is {how} (the graph was traced with it given)", ()
            for name, t in self.types:
                if type(given[name]) is not t:
                    return (f"argument {name!r} is a {type(given[name]).__name__}; the example inputs called it "
                            f"with a {t.__name__}"), ()
            ordered = tuple(given.get(n) for n in self.params)
        elif kwargs:
            return "keyword arguments to a forward traced with *args", ()
        for path, attr, value in self.attrs:
            mod = owner.get_submodule(path) if path else owner
            cur = mod.__dict__.get(attr, _MISSING)
            if not (cur is value or (type(cur) is type(value) and cur == value)):
                where = f"{path}.{attr}" if path else attr
                now = "deleted" if cur is _MISSING else repr(cur)
                return f"attribute {where} is {now}, it was {value!r} when the forward was traced", ()
        return None, ordered

    def describe(self) -> str:
        what = []
        given = [p for p in self.params if p not in self.nones]
        if given:
            what.append(f"{', '.join(given)} is None or omitted")
        if self.nones:
            what.append(f"{', '.join(sorted(self.nones))} is given (traced as None)")
        if self.types:
            what.append(f"an argument's type differs from the example inputs' ({', '.join(n for n, _ in self.types)})")
        if self.attrs:
            what.append(f"one of {len(self.attrs)} plain attributes changes")
        return "guarded: runs the original forward if " + " or ".join(what) if what else "unguarded"


# attributes the sparse modules update themselves while running (not the user's state)
_RUNTIME_ATTRS = frozenset({"last_path", "last_backend", "gate_sparsity_enabled", "force_sparse_path", "record_plans"})


def forward_params(module: nn.Module) -> tuple[tuple[str, ...], bool]:
    """The parameter names of ``module.forward`` (without self) and whether it is plain
    (no ``*args``/``**kwargs``, no keyword-only parameters)."""
    import inspect

    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return (), False
    ps = list(sig.parameters.values())[1:]
    plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY) for p in ps)
    return tuple(p.name for p in ps), plain


def guard_for(module: nn.Module, graph: fx.Graph, covered: list[str], fused: tuple = (),
              signatures: Optional[set] = None, nones: frozenset = frozenset()) -> ForwardGuard:
    """The :class:`ForwardGuard` of ``graph`` traced from ``module``; ``covered`` are the
    paths (relative to ``module``) of the submodules whose code the graph inlines or calls,
    ``fused`` the ``(path, StructuredDropout)`` of LSTMs that took over one of its dropouts,
    ``signatures`` the argument types ``module`` was called with on the example inputs,
    ``nones`` the parameters traced as None."""
    params, plain = forward_params(module)
    n_ph = sum(1 for n in graph.nodes if n.op == "placeholder")
    if not plain or n_ph != len(params):
        params, nones = (), frozenset()
    seen: dict[str, set] = {}
    for pos, kw in signatures or ():
        for name, t in (*zip(params, pos), *kw):
            seen.setdefault(name, set()).add(t)
    types = tuple((n, next(iter(ts))) for n, ts in seen.items()
                  if n in params and n not in nones and len(ts) == 1 and next(iter(ts)) is not type(None))
    attrs = []
    for path in dict.fromkeys([""] + list(covered)):
        mod = module.get_submodule(path) if path else module
        for k, v in vars(mod).items():
            if k.startswith("_") or k == "training" or k in _RUNTIME_ATTRS:
                continue
            if isinstance(v, (bool, int, float, str, type(None))):
                attrs.append((path, k, v))
    return ForwardGuard(params, tuple(attrs), tuple(fused), types, frozenset(nones))


class _GraphForward(_Rebuildable):
    """``forward`` is the code of a rewritten fx graph, compiled per instance, behind its
    :class:`ForwardGuard` (the original forward runs when the guard fails)."""

    def forward(self, *args, **kwargs):
        if self.__dict__.get("_rnn_sparsify_force_original") or (  # sparsify's verification pass
                not self.training and self.__dict__.get("_rnn_sparsify_eval_original")):  # a captured layer in eval()
            return self._rnn_sparsify_base.forward(self, *args, **kwargs)
        guard = self.__dict__.get("_rnn_sparsify_guard")
        if guard is not None:
            why, ordered = guard.bind(self, args, kwargs)
            if why is not None:
                return self._rnn_sparsify_original_forward(why, guard, args, kwargs)
            if guard.params:  # positionally: fx may have renamed a specialised parameter
                return self.__dict__["_rnn_sparsify_fwd"](self, *ordered)
        return self.__dict__["_rnn_sparsify_fwd"](self, *args, **kwargs)

    def _rnn_sparsify_original_forward(self, why: str, guard: ForwardGuard, args, kwargs):
        if not self.__dict__.get("_rnn_sparsify_warned"):
            self.__dict__["_rnn_sparsify_warned"] = True
            warnings.warn(f"rnn_sparsify: {type(self).__name__}: {why}; running its original forward "
                          "(its rewrites, hand-written cells on the sparse path and fused dropouts, do not apply "
                          "to such calls)", stacklevel=3)
        saved = []
        try:
            for path, sd in guard.fused:
                mod = self.get_submodule(path)
                saved.append((mod, mod.structured_dropout))
                mod.structured_dropout = sd
            return self._rnn_sparsify_base.forward(self, *args, **kwargs)
        finally:
            for mod, sd in saved:
                mod.structured_dropout = sd

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_rnn_sparsify_fwd", None)
        globs = state.pop("_rnn_sparsify_globals", None)
        if "_rnn_sparsify_import_block" not in state:
            state["_rnn_sparsify_import_block"] = _import_block(globs or {})
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        src = state["_rnn_sparsify_import_block"] + state["_rnn_sparsify_src"]
        self.__dict__["_rnn_sparsify_fwd"] = _compile(src, {})


def _import_block(globs: dict) -> str:
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    try:
        return _format_import_block(globs, sys_importer) + "\n"
    except Exception as e:  # a local function in the graph: cannot be saved by reference
        raise RuntimeError(
            f"rnn_sparsify: this rewritten module calls an object that cannot be imported by name "
            f"({e}); it runs, but cannot be pickled"
        ) from e


def _compile(src: str, globs: dict):
    from torch.fx.graph_module import _forward_from_src

    return _forward_from_src(src, globs)


def _rebuild(base: type, kind: str):
    cls = dynamic_class(base, kind)
    return cls.__new__(cls)


@functools.lru_cache(maxsize=None)
def dynamic_class(base: type, kind: str) -> type:
    """The dynamic subclass of ``base`` for ``kind`` in {"graph", "lstm", "cell"} (cached)."""
    if kind == "graph":
        bases, name = (_GraphForward, base), base.__name__
    # _Rebuildable last: first, it would make CPython pick another instance layout for
    # classes whose MRO starts with an ABC (``class M(ABC, nn.RNNBase)``), and __class__
    # assignment would be refused; nn.Module defines no __reduce_ex__, so it is still found
    elif kind == "lstm":
        bases, name = (base, SparseLSTM, _Rebuildable), f"Sparse{base.__name__}"
    elif kind == "cell":
        bases, name = (base, SparseLSTMCell, _Rebuildable), f"Sparse{base.__name__}"
    else:
        raise ValueError(f"unknown dynamic class kind {kind!r}")
    return type(name, bases, {"__module__": base.__module__, "__qualname__": name,
                              "_rnn_sparsify_base": base, "_rnn_sparsify_kind": kind})


def install_graph_forward(module: nn.Module, graph: fx.Graph, guard: Optional[ForwardGuard] = None) -> nn.Module:
    """Make ``graph`` (traced from ``module``) the forward of ``module``, in place, behind
    ``guard`` (see :class:`ForwardGuard`; None: unguarded).

    The graph's code reads ``self.<submodule>`` / ``self.<param>`` on ``module`` at every
    call, so later module swaps, ``.to()`` and ``load_state_dict`` are seen.
    """
    code = graph.python_code(root_module="self")
    base = type(module)
    if isinstance(module, _GraphForward):
        base = module._rnn_sparsify_base
    module.__class__ = dynamic_class(base, "graph")
    module.__dict__["_rnn_sparsify_src"] = code.src
    module.__dict__["_rnn_sparsify_globals"] = dict(code.globals)
    module.__dict__.pop("_rnn_sparsify_import_block", None)
    module.__dict__["_rnn_sparsify_fwd"] = _compile(code.src, code.globals)
    module.__dict__["_rnn_sparsify_guard"] = guard
    return module


# ---------------------------------------------------------------------------------------
# module swaps
def base_forward_problem(cls: type) -> Optional[str]:
    """Why a user subclass of nn.LSTM/LSTMCell cannot reach the sparse forward (None if it can)."""
    import inspect
    import re

    if "forward" not in vars(cls) and all("forward" not in vars(k) for k in cls.__mro__[1:]
                                          if k not in (nn.LSTM, nn.LSTMCell, nn.RNNBase, nn.RNNCellBase, nn.Module, object)):
        return None
    fwd = next(k for k in cls.__mro__ if "forward" in vars(k)).forward
    try:
        src = inspect.getsource(fwd)
    except (OSError, TypeError):
        return None  # no source: trust super()
    if re.search(r"\b(nn\.)?(LSTM|LSTMCell|RNNBase|RNNCellBase)\.forward\(\s*self", src):
        return (f"{cls.__name__}.forward calls the base class's forward explicitly "
                "(nn.LSTM.forward(self, ...)), which bypasses the sparse implementation; use super().forward(...)")
    if "super(" not in src and "_VF." not in src:
        return f"{cls.__name__}.forward does not call super().forward; there is no LSTM call to replace"
    if "_VF." in src:
        return f"{cls.__name__}.forward calls torch._VF directly; there is no LSTM call to replace"
    return None


def swap_lstm(m: nn.Module, structured_dropout: Optional[StructuredDropout],
              gate_sparsity: Optional[GateGradientSparsity]) -> nn.Module:
    """Make ``m`` sparse *in place* and return it: its class becomes ``SparseLSTM`` /
    ``SparseLSTMCell`` (or, for a user subclass, ``Sparse<Name>``, see the module docstring).

    The object stays the same, so everything the user attached to it is kept: parameters
    (with their ``requires_grad``), hooks, custom attributes, weights tied to other modules,
    every other reference to it (a plain Python list, another attribute). Only the configs
    are added (and ``dropout`` is set to 0 when ``structured_dropout.p_input > 0`` replaces
    it, as :meth:`SparseLSTM.from_dense` does). Raises ValueError if a config does not fit.
    """
    if isinstance(m, SparseMixin):
        raise ValueError(f"{type(m).__name__} is already sparse")
    is_lstm = isinstance(m, nn.LSTM)
    check_configs(structured_dropout, gate_sparsity, m.hidden_size, type(m).__name__)
    if type(m) is nn.LSTM:
        new_cls = SparseLSTM
    elif type(m) is nn.LSTMCell:
        new_cls = SparseLSTMCell
    else:
        try:
            new_cls = dynamic_class(type(m), "lstm" if is_lstm else "cell")
        except TypeError as e:  # e.g. a metaclass or base that cannot be combined
            raise ValueError(f"cannot build a sparse subclass of {type(m).__name__}: {e}") from e
    old_dropout = getattr(m, "dropout", None)
    if is_lstm and structured_dropout is not None and structured_dropout.p_input > 0:
        m.dropout = 0.0  # NR dropout replaces the inter-layer dropout (as SparseLSTM.from_dense)
    try:
        m.__class__ = new_cls
    except TypeError as e:  # an instance layout the sparse class cannot share (__slots__ ...)
        if is_lstm:
            m.dropout = old_dropout
        raise ValueError(f"cannot re-class {type(m).__name__} as {new_cls.__name__}: {e}") from e
    m._init_sparse(structured_dropout, gate_sparsity)
    return m


# ---------------------------------------------------------------------------------------
# hand-written cells
def _draw_kept(n: int, p: float, device) -> tuple[Optional[torch.Tensor], float]:
    """Kept units for one step (shared by the batch) and the inverted-dropout scale."""
    if p <= 0:
        return None, 1.0
    k = kept_count(n, p)
    idx = torch.randperm(n, device=device)[:k].sort().values
    return idx, n / k


class SparseCellRegion(nn.Module):
    """A hand-written LSTM cell after :func:`rewrite_cell`. Holds no parameters.

    ``forward(x, h, c, *params) -> (h', c')`` where ``params`` are the cell's own
    parameters, in the order of ``param_targets``.
    """

    def __init__(self, match: CellMatch, dense: fx.GraphModule, dropout_variant: fx.GraphModule,
                 param_targets: list[str], canonical: Optional[dict]) -> None:
        super().__init__()
        self.input_size = match.input_size
        self.hidden_size = match.hidden_size
        self.gate_order = match.gate_order
        self.description = match.describe()
        self.param_targets = list(param_targets)
        # fx GraphModules without parameters; stored as plain attributes (no state_dict keys)
        self.__dict__["dense"] = dense
        self.__dict__["dropout_variant"] = dropout_variant
        self.canonical = canonical
        self.structured_dropout: Optional[StructuredDropout] = None
        self.gate_sparsity: Optional[GateGradientSparsity] = None
        self.gate_sparsity_enabled = True
        self.last_path: Optional[str] = None

    _rnn_sparsify_leaf = True  # traced as one call (never re-matched as a hand-written cell)

    def set_gate_sparsity_phase(self, sparse: bool) -> None:
        """Dense/sparse phase switch for gate-gradient sparsity (``DenseAfterSparse``)."""
        self.gate_sparsity_enabled = bool(sparse)

    @property
    def active_gate_sparsity(self) -> Optional[GateGradientSparsity]:
        on = self.__dict__.get("gate_sparsity_enabled", True)
        return self.gate_sparsity if (self.gate_sparsity is not None and on) else None

    def configure(self, structured_dropout, gate_sparsity) -> None:
        if gate_sparsity is not None and self.canonical is None:
            raise ValueError("gate-gradient sparsity needs a cell without normalisation")
        check_configs(structured_dropout, gate_sparsity, self.hidden_size, "hand-written LSTM cell")
        self.structured_dropout = structured_dropout
        self.gate_sparsity = gate_sparsity

    def extra_repr(self) -> str:
        cfg = [f"structured_dropout={self.structured_dropout}"] if self.structured_dropout else []
        cfg += [f"gate_sparsity={self.gate_sparsity}"] if self.gate_sparsity else []
        return ", ".join([f"{self.input_size}, {self.hidden_size}, {self.description}"] + cfg)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_cell_template", None)
        return state

    def _wants_sparse_path(self) -> bool:
        sd = self.structured_dropout
        return self.training and ((sd is not None and sd.active) or self.active_gate_sparsity is not None)

    def _fits(self, x, h, c) -> bool:
        """The shapes the sparse path assumes: ``x (..., I)``, ``h``/``c`` ``(..., H)``, one
        leading shape. Anything else runs the original code, which raises the original's
        error (or computes what the original computes, e.g. by broadcasting)."""
        return (x.dim() >= 1 and x.shape[-1] == self.input_size and h.shape == c.shape
                and h.shape[-1] == self.hidden_size and x.shape[:-1] == h.shape[:-1])

    def forward(self, x, h, c, *params):
        if not self._wants_sparse_path() or not self._fits(x, h, c):
            self.last_path = "dense"
            return self.dense(x, h, c, *params)
        self.last_path = "sparse"
        if self.canonical is not None:
            return self._as_lstm_cell(x, h, c, params)
        sd = self.structured_dropout
        kx, sx = _draw_kept(self.input_size, sd.p_input, x.device)
        kh, sh = _draw_kept(self.hidden_size, sd.p_recurrent, x.device)
        full_x = torch.arange(self.input_size, device=x.device) if kx is None else kx
        full_h = torch.arange(self.hidden_size, device=x.device) if kh is None else kh
        return self.dropout_variant(x, h, c, full_x, full_h, sx, sh, *params)

    # -- cells without normalisation: nn.LSTMCell math on rearranged weights ----------------
    def _template(self, bias: bool) -> SparseLSTMCell:
        key = ("_template", bias)
        t = self.__dict__.get("_cell_template")
        if t is None or t[0] != key:
            cell = SparseLSTMCell(self.input_size, self.hidden_size, bias=bias, device="meta",
                                  structured_dropout=self.structured_dropout, gate_sparsity=self.gate_sparsity)
            self.__dict__["_cell_template"] = (key, cell)
            t = self.__dict__["_cell_template"]
        return t[1]

    def lstm_cell_params(self, params) -> dict[str, torch.Tensor]:
        """The cell's parameters as ``nn.LSTMCell`` would hold them (gate order i, f, g, o)."""
        spec = self.canonical
        dev = params[0].device
        perm = torch.as_tensor(spec["perm"], device=dev)

        def weight(s):
            w = params[s["param"]]
            w = w if s["layout"] == "out_in" else w.t()
            if s["cols"] is not None:
                w = w[:, s["cols"][0]:s["cols"][1]]
            return w.index_select(0, perm)

        def bias(idx):
            if not idx:
                return None
            b = params[idx[0]]
            for i in idx[1:]:
                b = b + params[i]
            return b.index_select(0, perm)

        out = {"weight_ih": weight(spec["w_ih"]), "weight_hh": weight(spec["w_hh"])}
        b_ih, b_hh = bias(spec["b_ih"]), bias(spec["b_hh"])
        if b_ih is not None or b_hh is not None:
            ref = b_ih if b_ih is not None else b_hh
            out["bias_ih"] = b_ih if b_ih is not None else torch.zeros_like(ref)
            out["bias_hh"] = b_hh if b_hh is not None else torch.zeros_like(ref)
        return out

    def _as_lstm_cell(self, x, h, c, params):
        p = self.lstm_cell_params(params)
        cell = self._template("bias_ih" in p)
        cell.structured_dropout, cell.gate_sparsity = self.structured_dropout, self.active_gate_sparsity
        cell.train(self.training)
        lead = x.shape[:-1]
        x2, h2, c2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), c.reshape(-1, c.shape[-1])
        h_new, c_new = torch.func.functional_call(cell, p, (x2, (h2, c2)), strict=False)
        return h_new.reshape(*lead, -1), c_new.reshape(*lead, -1)


def _cell_params(gm: fx.GraphModule, match: CellMatch) -> list[str]:
    targets: list[str] = []
    for n in match.nodes:
        if n.op == "get_attr":
            targets.append(n.target)
        elif n.op == "call_module":
            m = gm.get_submodule(n.target)
            for name, p in m.named_parameters(recurse=False):
                if p is not None:
                    targets.append(f"{n.target}.{name}")
    return list(dict.fromkeys(targets))


def extract_cell(gm: fx.GraphModule, match: CellMatch, *, with_dropout: bool) -> tuple[fx.GraphModule, list[str]]:
    """The cell as a standalone, parameter-free graph ``(x, h, c, *params) -> (h', c')``.

    With ``with_dropout`` the graph takes ``(x, h, c, kx, kh, sx, sh, *params)`` and runs every
    projection on the kept columns only: ``x[..., kx] * sx`` against ``W[:, kx]`` (and the same
    for ``h`` with ``kh``), the structured (NR + RH) dropout as gather-K.
    """
    targets = _cell_params(gm, match)
    g = fx.Graph()
    env: dict[fx.Node, Any] = {match.x: g.placeholder("x"), match.h: g.placeholder("h"), match.c: g.placeholder("c")}
    drop: dict[str, Any] = {}
    if with_dropout:
        kx, kh, sx, sh = (g.placeholder(n) for n in ("kx", "kh", "sx", "sh"))
        drop = {"x": g.call_function(operator.mul, (g.call_method("index_select", (env[match.x], -1, kx)), sx)),
                "h": g.call_function(operator.mul, (g.call_method("index_select", (env[match.h], -1, kh)), sh)),
                "kx": kx, "kh": kh}
    ph = {t: g.placeholder(f"p{i}") for i, t in enumerate(targets)}
    I, H = match.input_size, match.hidden_size
    # which weight belongs to which projection, and the column index it keeps
    w_index: dict[str, tuple[str, Any]] = {}
    if with_dropout:
        for p in match.projections:
            in_dim = 1 if p.layout == "out_in" else 0
            if len(p.parts) == 1:
                idx = drop["k" + p.parts[0]]
            else:
                first, second = p.parts
                off = I if first == "x" else H
                idx = g.call_function(torch.cat, ([drop["k" + first],
                                                   g.call_function(operator.add, (drop["k" + second], off))],))
            w_index[p.weight] = (in_dim, idx)

    def param(target: str):
        if target in w_index:
            dim, idx = w_index[target]
            return g.call_method("index_select", (ph[target], dim, idx))
        return ph[target]

    proj_inputs = {p.node: p for p in match.projections}
    cat_nodes = {p.inp: p for p in match.projections if len(p.parts) > 1}

    def remap(n):
        return env[n]

    for n in match.nodes:
        if n.op == "get_attr":
            env[n] = param(n.target)
            continue
        if with_dropout and n in cat_nodes:
            p = cat_nodes[n]
            parts = [drop[r] for r in p.parts]
            env[n] = g.call_function(torch.cat, (parts,), {"dim": -1})
            continue
        mapper = remap
        if with_dropout and n in proj_inputs and len(proj_inputs[n].parts) == 1:
            p = proj_inputs[n]
            role = p.parts[0]
            mapper = (lambda a, _p=p, _r=role: drop[_r] if a is _p.inp else env[a])
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            a0 = mapper(n.args[0])
            if type(m) is nn.Linear:
                w = param(f"{n.target}.weight")
                b = ph[f"{n.target}.bias"] if m.bias is not None else None
                env[n] = g.call_function(F.linear, (a0, w, b))
            elif isinstance(m, nn.LayerNorm):
                w = ph.get(f"{n.target}.weight")
                b = ph.get(f"{n.target}.bias")
                env[n] = g.call_function(F.layer_norm, (a0, m.normalized_shape, w, b, m.eps))
            elif isinstance(m, _NORM_MODULES):  # RMSNorm
                w = ph.get(f"{n.target}.weight")
                env[n] = g.call_function(F.rms_norm, (a0, m.normalized_shape, w, m.eps))
            elif isinstance(m, nn.Sigmoid):
                env[n] = g.call_function(torch.sigmoid, (a0,))
            elif isinstance(m, nn.Tanh):
                env[n] = g.call_function(torch.tanh, (a0,))
            else:  # the matcher only accepts the modules above
                raise AssertionError(f"unexpected module {type(m).__name__} in a matched cell")
            continue
        env[n] = g.node_copy(n, mapper)
    g.output((env[match.h_out], env[match.c_out]))
    g.lint()
    return fx.GraphModule(nn.Module(), g, "HandWrittenLSTMCell"), targets


def _canonical_spec(gm: fx.GraphModule, match: CellMatch, targets: list[str]) -> Optional[dict]:
    """How to build nn.LSTMCell weights from the cell's parameters (None if normalised)."""
    if not match.canonical:
        return None
    H, I = match.hidden_size, match.input_size
    pos = {r: match.gate_order.index(r) for r in "ifgo"}
    perm = [pos[r] * H + k for r in "ifgo" for k in range(H)]
    spec: dict[str, Any] = {"perm": perm, "b_ih": [], "b_hh": []}
    for p in match.projections:
        if len(p.parts) == 1:
            spec["w_" + ("ih" if p.parts == ["x"] else "hh")] = {"param": targets.index(p.weight),
                                                                "layout": p.layout, "cols": None}
            if p.bias:
                spec["b_" + ("ih" if p.parts == ["x"] else "hh")].append(targets.index(p.bias))
        else:
            first = p.parts[0]
            n_first = I if first == "x" else H
            cols = {first: (0, n_first), p.parts[1]: (n_first, I + H)}
            spec["w_ih"] = {"param": targets.index(p.weight), "layout": p.layout, "cols": cols["x"]}
            spec["w_hh"] = {"param": targets.index(p.weight), "layout": p.layout, "cols": cols["h"]}
            if p.bias:
                spec["b_ih"].append(targets.index(p.bias))
    spec["b_ih"] += [targets.index(b) for b in match.extra_biases]
    return spec


def build_region(gm: fx.GraphModule, match: CellMatch) -> SparseCellRegion:
    dense, targets = extract_cell(gm, match, with_dropout=False)
    variant, targets2 = extract_cell(gm, match, with_dropout=True)
    assert targets == targets2
    return SparseCellRegion(match, dense, variant, targets, _canonical_spec(gm, match, targets))


def rewrite_cell(gm: fx.GraphModule, match: CellMatch, name: str, region: SparseCellRegion) -> PassResult:
    """Replace the matched cell in ``gm`` by ``call_module name(x, h, c, *params)``.

    Pre: ``match`` was found in ``gm``'s current graph. Post: ``gm`` lints, no node of the
    cell remains, every former user of h'/c' reads the region's outputs.
    """
    g = gm.graph
    order = {n: k for k, n in enumerate(g.nodes)}
    last_input = max((match.x, match.h, match.c), key=order.get)
    gm.add_submodule(name, region)
    with g.inserting_before(last_input.next):
        getters = [g.get_attr(t) for t in region.param_targets]
        call = g.call_module(name, (match.x, match.h, match.c, *getters))
        h_new = g.call_function(operator.getitem, (call, 0))
        c_new = g.call_function(operator.getitem, (call, 1))
    match.h_out.replace_all_uses_with(h_new)
    match.c_out.replace_all_uses_with(c_new)
    for n in reversed(match.nodes):
        if not n.users:
            g.erase_node(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.lint()
    gm.recompile()
    return PassResult(gm, True)
