"""``sparsify(model, *configs)``: find every LSTM in a model and make it sparse.

Pipeline (each step a pass of :mod:`rnn_sparsify.passes`), on one deep copy of the model
(the caller's model and the global RNG are left as they were):

1. with ``example_inputs``: observe every module's calls (tokens; argument types and the
   optional arguments never passed, which are traced as None); the copy's Python state is
   restored afterwards.
2. ``trace_degrading``: fx-trace what can be traced, keep the rest opaque (also a forward
   that changes Python state while traced).
3. ``find_lstms``: ``nn.LSTM``/``nn.LSTMCell`` (and subclasses) anywhere, hand-written
   cells in traced graphs, TorchScript modules and LSTMs called as ``nn.LSTM.forward(self.x,
   ...)`` (skipped, with the reason).
4. ``swap_lstm``: each ``nn.LSTM`` re-classed in place as ``SparseLSTM`` (a subclass keeps
   its own forward), with its weight sparsity (``WeightSparsity`` config).
5. per traced module that needs it: ``rewrite_cell`` (hand-written cell -> sparse cell
   region) and ``fuse_dropout`` (dropout feeding an LSTM -> its structured NR dropout,
   only when a ``StructuredDropout`` config is given); the module gets the new forward,
   behind a guard (``ForwardGuard``) that runs the original forward where the graph does
   not apply.
6. with ``example_inputs``: verification; a rewritten forward that changes the ``eval()``
   outputs is undone.

An error in step 4 or 5 skips that LSTM (or graph) with the error in the report and undoes
what was done to it. Configs are dispatched by type (one of each at most):
``StructuredDropout``, ``GateGradientSparsity``, ``WeightSparsity``. The result carries a
:class:`SparsifyReport` (``model.rnn_sparsify_report`` / :func:`get_report`).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from torch.nn.utils.rnn import PackedSequence as PackedSequenceType

from .config import GateGradientSparsity, StructuredDropout, kept_count

__all__ = ["sparsify", "inspect_model", "SparsifyReport", "LSTMEntry", "get_report", "NoLSTMFoundError",
           "GRAPH_REWRITE", "MODULE_SWAP", "SKIPPED", "REPORT_ATTR"]

GRAPH_REWRITE = "graph rewrite"
MODULE_SWAP = "module swap"
SKIPPED = "skipped"
REPORT_ATTR = "rnn_sparsify_report"
PHASES = ("forward", "backward_data", "weight_gradient")


class NoLSTMFoundError(LookupError):
    """The model holds no LSTM, LSTMCell or hand-written LSTM cell."""


# ---------------------------------------------------------------------------------------
# configs
@dataclass(frozen=True)
class _Configs:
    structured_dropout: Optional[StructuredDropout] = None
    gate_sparsity: Optional[GateGradientSparsity] = None
    weight_sparsity: Any = None

    def to_list(self) -> list[dict]:
        return [c.to_dict() for c in (self.structured_dropout, self.gate_sparsity, self.weight_sparsity) if c is not None]


def _dispatch(configs: tuple) -> _Configs:
    slots: dict[str, Any] = {}
    handlers: dict[type, str] = {StructuredDropout: "structured_dropout", GateGradientSparsity: "gate_sparsity"}
    try:
        from .weight_sparsity import WeightSparsity

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
    return _Configs(**slots)


def _require_config(configs: tuple) -> None:
    """``sparsify`` changes nothing sparse without a config: refuse, as ``torchao.quantize_`` does."""
    if not configs:
        raise TypeError(
            "sparsify: no config given, so nothing would become sparse. Pass at least one of "
            "StructuredDropout(p_input, p_recurrent), GateGradientSparsity.coarse()/.fine()/.meprop(), "
            "WeightSparsity.gradual(total_steps, ...)/.dst(...), e.g. sparsify(model, StructuredDropout(0.25, 0.25)); "
            "to see what sparsify would find without changing anything, call inspect_model(model) "
            "or run `rnn-sparsify inspect file.py:factory`")


# ---------------------------------------------------------------------------------------
# FLOPs
def _gate_keep(gs: Optional[GateGradientSparsity], hidden: int, batch: int) -> float:
    if gs is None:
        return 1.0
    from .gate_selection import kept_column_count

    if gs.mode in ("coarse", "meprop"):
        return kept_column_count(4 * hidden, gs) / (4 * hidden)
    blocks = math.ceil(batch / gs.My)  # fine: K of the ceil(batch/My) sub-matrices of a slice dropped
    return max(blocks - gs.K, 1) / blocks if blocks else 1.0


def _layer_gemms(shapes: dict) -> list[tuple[int, int, int, int]]:
    """(gate columns 4H, input width, recurrent width, projection H*P) per layer-direction."""
    H, I = shapes["hidden_size"], shapes["input_size"]
    P = shapes.get("proj_size") or 0
    R = P or H
    D = 2 if shapes.get("bidirectional") else 1
    out = []
    for layer in range(shapes.get("num_layers", 1)):
        width = I if layer == 0 else D * R
        out += [(4 * H, width, R, H * P)] * D
    return out


def flops_per_token(shapes: dict, sd: Optional[StructuredDropout], gs: Optional[GateGradientSparsity],
                    batch: int) -> dict[str, dict[str, float]]:
    """GEMM FLOPs per token (one row of one time step) per phase, dense vs sparse.

    forward: ``2*4H*(in*kx + rec*kh)``; backward-data and weight-gradient: the same times
    the kept fraction of gate-gradient columns ``kg`` (the dropped input/recurrent units need
    no gradient either). ``kx``/``kh`` are the exact kept fractions of NR/RH dropout. The
    ``proj_size`` GEMM is dense in every phase. Element-wise gate math is not counted.
    """
    res = {ph: {"dense": 0.0, "sparse": 0.0} for ph in PHASES}
    for G, width, rec, proj in _layer_gemms(shapes):
        kx = kept_count(width, sd.p_input) / width if sd else 1.0
        kh = kept_count(rec, sd.p_recurrent) / rec if sd else 1.0
        kg = _gate_keep(gs, G // 4, batch)
        dense = 2.0 * G * (width + rec)
        fwd = 2.0 * G * (width * kx + rec * kh)
        for ph, sparse in (("forward", fwd), ("backward_data", fwd * kg), ("weight_gradient", fwd * kg)):
            res[ph]["dense"] += dense + 2.0 * proj
            res[ph]["sparse"] += sparse + 2.0 * proj
    return res


# ---------------------------------------------------------------------------------------
# report
@dataclass
class LSTMEntry:
    """One LSTM-like thing found in the model and what was done with it."""

    fqn: str
    kind: str
    shapes: dict
    handling: str  # "graph rewrite" | "module swap" | "skipped"
    reason: str
    location: str
    configs: list[dict] = field(default_factory=list)
    backend: Optional[str] = None
    fused_dropout: Optional[dict] = None
    observed: Optional[dict] = None  # {"calls", "tokens"} from example_inputs
    weight_sparsity: Optional[dict] = None
    node: Optional[str] = None
    _sd: Optional[StructuredDropout] = field(default=None, repr=False)
    _gs: Optional[GateGradientSparsity] = field(default=None, repr=False)

    def flops(self, tokens: int, batch: int) -> Optional[dict]:
        if self.handling == SKIPPED or "hidden_size" not in self.shapes:
            return None
        per = flops_per_token(self.shapes, self._sd, self._gs, batch)
        out = {}
        for ph, d in per.items():
            dense, sparse = d["dense"] * tokens, d["sparse"] * tokens
            out[ph] = {"dense": dense, "sparse": sparse, "saving": 1.0 - sparse / dense if dense else 0.0}
        return out

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        d["shapes"] = dict(self.shapes)
        return d


def _fmt_shapes(e: LSTMEntry) -> str:
    s = e.shapes
    if "hidden_size" not in s:
        return "-"
    txt = f"{s['input_size']}->{s['hidden_size']}"
    if s.get("num_layers", 1) > 1:
        txt += f" x{s['num_layers']}"
    if s.get("bidirectional"):
        txt += " bi"
    if s.get("proj_size"):
        txt += f" proj{s['proj_size']}"
    if s.get("gate_order"):
        txt += f" {s['gate_order']}"
    if s.get("normalisation"):
        txt += " +norm"
    return txt


@dataclass
class SparsifyReport:
    """What :func:`sparsify` found and did. ``to_dict()`` is the JSON form (``version`` 1).

    * ``lstms``: one :class:`LSTMEntry` per LSTM-like thing (name, kind, shapes, handling
      ``graph rewrite`` / ``module swap`` / ``skipped``, the reason, configs applied, backend).
    * ``graph_rewrites``: module -> changes made to its forward.
    * ``untraceable``: module -> why fx could not trace it (its LSTMs were swapped in place).
    * ``dropouts``: dropouts fused into an LSTM, and those that could not be, with the reason.
    * ``verification`` (with ``example_inputs``): the rewritten forwards checked against the
      original forwards on them in ``eval()``, and those undone because they differed.
    * ``flops(batch_size, seq_len)``: GEMM FLOPs per phase (forward, backward_data,
      weight_gradient), dense vs sparse, per LSTM and in total.
    """

    lstms: list[LSTMEntry]
    configs: list[dict]
    graph_rewrites: dict[str, list[str]]
    untraceable: dict[str, str]
    dropouts: list[dict]
    details: dict[str, str] = field(default_factory=dict)  # module -> raw error text (``--verbose``)
    applied: bool = True
    verification: Optional[dict] = None

    def __getitem__(self, fqn: str) -> LSTMEntry:
        for e in self.lstms:
            if e.fqn == fqn:
                return e
        raise KeyError(fqn)

    @property
    def handled(self) -> list[LSTMEntry]:
        return [e for e in self.lstms if e.handling != SKIPPED]

    def flops(self, batch_size: Optional[int] = None, seq_len: Optional[int] = None) -> dict:
        """FLOPs for ``batch_size`` x ``seq_len`` tokens per LSTM (time steps per call for
        cells), or, with both None, for the tokens observed with ``example_inputs``."""
        per, total = {}, {ph: {"dense": 0.0, "sparse": 0.0} for ph in PHASES}
        for e in self.handled:
            if batch_size is not None and seq_len is not None:
                tokens, batch = batch_size * seq_len, batch_size
            elif e.observed:
                tokens, batch = e.observed["tokens"], e.observed["batch"]
            else:
                continue
            f = e.flops(tokens, batch)
            if f is None:
                continue
            key = e.fqn if e.node is None else f"{e.fqn}[{e.node}]"
            per[key] = f
            for ph in PHASES:
                total[ph]["dense"] += f[ph]["dense"]
                total[ph]["sparse"] += f[ph]["sparse"]
        for ph in PHASES:
            d = total[ph]["dense"]
            total[ph]["saving"] = 1.0 - total[ph]["sparse"] / d if d else 0.0
        return {"batch_size": batch_size, "seq_len": seq_len, "per_lstm": per, "total": total}

    def to_dict(self, batch_size: Optional[int] = None, seq_len: Optional[int] = None) -> dict:
        d = {
            "version": 1,
            "applied": self.applied,
            "configs": self.configs,
            "lstms": [e.to_dict() for e in self.lstms],
            "graph_rewrites": self.graph_rewrites,
            "untraceable": self.untraceable,
            "dropouts": self.dropouts,
            "details": self.details,
        }
        if self.verification is not None:
            d["verification"] = self.verification
        if batch_size is not None and seq_len is not None:
            d["flops"] = self.flops(batch_size, seq_len)
        elif any(e.observed for e in self.lstms):
            d["flops"] = self.flops()
        return d

    def table(self, batch_size: Optional[int] = None, seq_len: Optional[int] = None) -> str:
        from rnn_sparsify.passes.find_lstm import display_fqn

        rows = [("LSTM", "kind", "shapes", "handling", "why / where")]
        for e in self.lstms:
            name = display_fqn(e.fqn) + (f"[{e.node}]" if e.node and e.kind.startswith("hand") else "")
            note = e.reason
            if e.fused_dropout:
                note += f"; fused {e.fused_dropout['source']} p={e.fused_dropout['p']}"
            rows.append((name, e.kind, _fmt_shapes(e), e.handling, note))
        widths = [min(max(len(r[k]) for r in rows), 40) for k in range(4)]
        lines = []
        for r in rows:
            cells = [r[k].ljust(widths[k]) for k in range(4)]  # never cut: a long name breaks alignment only
            lines.append("  ".join(cells + [r[4]]))
        lines.insert(1, "-" * min(len(lines[0]), 120))
        if self.configs:
            lines.append("")
            lines.append("configs: " + "; ".join(str(c) for c in self.configs))
        for fqn, changes in self.graph_rewrites.items():
            lines.append(f"rewrote forward of {display_fqn(fqn)}: " + "; ".join(changes))
        ws = [e for e in self.lstms if e.weight_sparsity]
        if ws:
            from .weight_sparsity import format_weight_sparsity_stats

            lines.append("")
            lines.extend(format_weight_sparsity_stats(e.weight_sparsity, display_fqn(e.fqn)) for e in ws)
        for dd in self.dropouts:
            if not dd.get("fused"):
                at = f" ({dd['location']})" if dd.get("location") else ""
                lines.append(f"dropout {dd['node']}{at} not fused into {dd['target']}: {dd['reason']}")
        f = self.flops(batch_size, seq_len) if batch_size and seq_len else (
            self.flops() if any(e.observed for e in self.lstms) else None)
        if f and f["per_lstm"]:
            what = f"batch {batch_size} x seq {seq_len}" if batch_size else "example inputs"
            parts = [f"{ph} {f['total'][ph]['sparse'] / 1e6:.3g}/{f['total'][ph]['dense'] / 1e6:.3g} MFLOP "
                     f"(-{100 * f['total'][ph]['saving']:.1f}%)" for ph in PHASES]
            lines.append(f"GEMM FLOPs sparse/dense ({what}): " + ", ".join(parts))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def get_report(model: nn.Module) -> SparsifyReport:
    """The report attached by :func:`sparsify`."""
    rep = getattr(model, REPORT_ATTR, None)
    if not isinstance(rep, SparsifyReport):
        raise ValueError("this model was not produced by rnn_sparsify.sparsify (no report attached)")
    return rep


# ---------------------------------------------------------------------------------------
def _observe(model: nn.Module, example_inputs, example_kwargs=None,
             signatures: Optional[dict] = None) -> dict[int, dict]:
    """Calls and tokens (rows of one time step) of every module on ``example_inputs`` (and
    ``example_kwargs``); with ``signatures``, also the argument types of every call of every
    module (id -> set of ``(positional types, sorted (keyword, type))``)."""
    from torch.nn.utils.rnn import PackedSequence

    seen: dict[int, dict] = {}

    def hook(mod, args, kwargs):
        if signatures is not None:
            signatures.setdefault(id(mod), set()).add(
                (tuple(type(a) for a in args), tuple(sorted((k, type(v)) for k, v in kwargs.items()))))
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, PackedSequence):
            tokens, batch = int(x.data.shape[0]), int(x.batch_sizes[0])
        elif isinstance(x, torch.Tensor) and x.dim() >= 1:
            tokens = x.numel() // max(x.shape[-1], 1)
            if isinstance(mod, nn.LSTM):
                batch = 1 if x.dim() == 2 else int(x.shape[0] if mod.batch_first else x.shape[1])
            else:
                batch = tokens if x.dim() == 2 else 1
        else:
            return
        rec = seen.setdefault(id(mod), {"calls": 0, "tokens": 0, "batch": 0})
        rec["calls"] += 1
        rec["tokens"] += tokens
        rec["batch"] = max(rec["batch"], batch)

    from rnn_sparsify.passes.trace import PythonState, is_scripted

    state = PythonState(model)  # the run must not leave a trace (self.calls += 1, buffers)
    scripted = [m for m in model.modules() if is_scripted(m)]
    inside = {id(sub) for m in scripted for sub in m.modules()}
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if id(m) not in inside]
    modes = {m: m.training for m in model.modules()}
    inputs = () if example_inputs is None else example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs, **(example_kwargs or {}))
    except Exception as e:
        raise ValueError(f"sparsify: example_inputs do not run through the model: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
        state.restore()
    return seen


def _copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy``, except TorchScript submodules, which are copied by a
    ``torch.jit.save``/``load`` round trip (their deepcopy yields non-leaf parameters), and
    ``__slots__`` values, which are copied explicitly."""
    import io

    from rnn_sparsify.passes.trace import is_scripted

    memo: dict = {}
    for m in model.modules():
        if is_scripted(m) and id(m) not in memo:
            buf = io.BytesIO()
            torch.jit.save(m, buf)
            buf.seek(0)
            dev = next((p.device for p in m.parameters()), None)
            new = torch.jit.load(buf, map_location=dev)
            new.train(m.training)
            for (_, p_old), (_, p_new) in zip(m.named_parameters(), new.named_parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            memo[id(m)] = new
            for sub in m.modules():  # children are copied with their scripted parent
                memo.setdefault(id(sub), None) if sub is not m else None
    memo = {k: v for k, v in memo.items() if v is not None}
    work = copy.deepcopy(model, memo)
    # nn.Module's __getstate__ returns only __dict__: values in __slots__ of a user subclass
    # would be lost (also by torch.save); copy them over
    for m in model.modules():
        new = memo.get(id(m))
        if new is None or new is m:
            continue
        for name in {n for k in type(m).__mro__ for n in getattr(k, "__slots__", ()) if isinstance(n, str)}:
            if name in ("__dict__", "__weakref__") or not hasattr(m, name):
                continue
            setattr(new, name, copy.deepcopy(getattr(m, name), memo))
    return work


def _run(model: nn.Module, configs: tuple, filter_fn, example_inputs, applied: bool, example_kwargs=None):
    from rnn_sparsify.passes.find_lstm import display_fqn, find_lstms
    from rnn_sparsify.passes.rewrite import guard_for, install_graph_forward, swap_lstm
    from rnn_sparsify.passes.trace import trace_degrading

    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("sparsify: filter_fn must be callable as filter_fn(module, fqn) -> bool")
    cfg = _dispatch(configs)
    work = _copy_model(model)
    signatures: dict[int, set] = {}
    observed = (_observe(work, example_inputs, example_kwargs, signatures)
                if example_inputs is not None or example_kwargs is not None else {})
    none_args = _never_passed(work, signatures)
    tr = trace_degrading(work, none_args)
    sites = find_lstms(work, tr)
    sd, gs = cfg.structured_dropout, cfg.gate_sparsity

    entries: list[LSTMEntry] = []
    by_site = {}
    for s in sites:
        e = LSTMEntry(s.fqn, s.kind, s.shapes, SKIPPED, "", s.location, node=s.node)
        by_site[id(s)] = e
        entries.append(e)
        if s.module is not None and id(s.module) in observed:
            e.observed = dict(observed[id(s.module)])
        if s.refusal:
            e.reason = s.refusal
            continue
        if filter_fn is not None and not filter_fn(s.module, s.fqn):
            e.reason = "excluded by filter_fn"
            continue
        e._sd, e._gs = sd, gs
        if s.match is not None:
            if s.match.norms and gs is not None:
                e._gs = None
                msg = ("gate-gradient sparsity not applied: normalisation between the projections and the "
                       "gates makes the projections' gradient dense again")
                if sd is None:
                    e.reason = msg
                    continue
                e.reason = msg + "; "
            e.handling = GRAPH_REWRITE
            e.reason += f"{s.match.describe()}; h found as: {s.match.how_h_found}"
        else:
            if gs is not None:
                try:
                    gs.validate_for(s.shapes["hidden_size"], display_fqn(s.fqn))
                except ValueError as err:
                    e.reason = str(err)
                    e._sd = e._gs = None
                    continue
            if cfg.weight_sparsity is not None:
                from .weight_sparsity import check_weight_sparsity_fits

                try:
                    check_weight_sparsity_fits(s.module, cfg.weight_sparsity)
                except ValueError as err:
                    e.reason = f"weight sparsity does not fit this LSTM: {err}"
                    e._sd = e._gs = None
                    continue
            e.handling = MODULE_SWAP
            if type(s.module) in (nn.LSTM, nn.LSTMCell):
                what = f"re-classed as Sparse{type(s.module).__name__} in place"
            else:
                base = "SparseLSTM" if isinstance(s.module, nn.LSTM) else "SparseLSTMCell"
                name = type(s.module).__name__
                what = (f"re-classed as Sparse{name} (MRO Sparse{name} -> {name} -> {base}): its own forward "
                        f"is kept and its super().forward reaches {base}")
            e.reason = f"{what}; {s.location}"
    from rnn_sparsify.passes.find_lstm import PROBABLE_LAYER

    if sites and all(s.kind == PROBABLE_LAYER for s in sites):
        raise NoLSTMFoundError("no LSTM that sparsify can rewrite; " + "; ".join(
            f"{display_fqn(s.fqn)}: {s.refusal}" for s in sites))
    if not sites:
        raise NoLSTMFoundError(
            "no nn.LSTM, nn.LSTMCell, hand-written LSTM cell or TorchScript module found in the model"
            + (f" (untraceable: {', '.join(display_fqn(k) for k in tr.opaque)})" if tr.opaque else "")
        )

    # module swaps (and weight sparsity), each contained: an error skips that LSTM only -----
    errors: list[str] = []
    for s in sites:
        e = by_site[id(s)]
        if e.handling != MODULE_SWAP:
            continue
        undo = _ModuleUndo(s.module)
        try:
            swap_lstm(s.module, e._sd, e._gs)  # in place: every reference sees the sparse module
            if cfg.weight_sparsity is not None:
                from .weight_sparsity import attach_weight_sparsity, weight_sparsity_stats

                attach_weight_sparsity(s.module, cfg.weight_sparsity, name=s.fqn)
                e.weight_sparsity = weight_sparsity_stats(s.module)
        except Exception as err:  # noqa: BLE001 - contained: reported, the module restored
            undo.restore()
            _fail(e, err, errors)
            continue
        e.__dict__["_module"] = s.module

    # graph rewrites, per traced module, each contained --------------------------------------
    swapped = {e.fqn: e for s, e in ((s, by_site[id(s)]) for s in sites) if e.handling == MODULE_SWAP}
    for s in sites:  # aliases of swapped modules point at the same entry
        if by_site[id(s)].handling == MODULE_SWAP:
            for a in s.aliases:
                swapped[a] = by_site[id(s)]
    graph_rewrites: dict[str, list[str]] = {}
    dropouts: list[dict] = []
    calls: dict[int, int] = {}  # id(module) -> call_module nodes calling it, over every graph
    for tg in tr.graphs.values():
        for n in tg.gm.graph.nodes:
            if n.op == "call_module":
                mod = tg.gm.get_submodule(n.target)
                calls[id(mod)] = calls.get(id(mod), 0) + 1
    pending: list[tuple] = []  # graph forwards to install: (owner, graph, covered paths, fused, changes)
    for gfqn, tg in tr.graphs.items():
        cells = [(s, by_site[id(s)]) for s in sites
                 if s.graph_fqn == gfqn and s.match is not None and by_site[id(s)].handling == GRAPH_REWRITE]
        undo = _GraphUndo(work.get_submodule(gfqn))
        try:
            done = _rewrite_graph(work, gfqn, tg, cells, swapped, calls, sd, tr, undo)
        except Exception as err:  # noqa: BLE001 - contained: this graph's cells skipped, fusions undone
            undo.restore()
            for _, e in cells:
                _fail(e, err, errors)
            for s in sites:  # LSTMs swapped in place stay swapped (their own config), unfused
                e = by_site[id(s)]
                if e.fused_dropout and e.fused_dropout.get("graph") == display_fqn(gfqn):
                    e._sd, e.fused_dropout = sd, None
            dropouts.append({"graph": display_fqn(gfqn), "fused": False,
                             "reason": f"graph rewrite failed: {type(err).__name__}: {err}"})
            continue
        dropouts.extend(done["dropouts"])
        if done["pending"] is not None:
            pending.append((gfqn, undo, cells, *done["pending"]))
            graph_rewrites[gfqn] = done["pending"][-1]

    for s in sites:
        e = by_site[id(s)]
        if e.handling == SKIPPED:
            continue
        w = next(iter(s.module.parameters()), None)
        e.configs = [c.to_dict() for c in (e._sd, e._gs) if c is not None]
        if w is not None:
            e.backend = _backend_of(s.module, e, observed)
        if cfg.weight_sparsity is not None:
            if e.handling == MODULE_SWAP:
                e.configs.append(cfg.weight_sparsity.to_dict())
            else:
                e.reason += "; weight sparsity not attached (it applies to nn.LSTM/nn.LSTMCell modules)"
        e.__dict__.pop("_module", None)

    for _, _, _, owner, graph, covered, fused, changes in pending:
        guard = guard_for(owner, graph, covered, fused, signatures.get(id(owner)), none_args.get(id(owner), frozenset()))
        install_graph_forward(owner, graph, guard)
        changes.append(guard.describe())

    verification = None
    if example_inputs is not None and pending:
        verification = _verify_graph_rewrites(work, example_inputs, pending, graph_rewrites, dropouts, sd, entries,
                                              example_kwargs)
    if errors and not any(e.handling != SKIPPED for e in entries):
        raise RuntimeError("sparsify: no LSTM could be handled: " + "; ".join(errors))

    from rnn_sparsify.passes.fuse_dropout import untraced_dropouts  # next to LSTMs in untraceable code

    dropouts += untraced_dropouts(work, tr.opaque, [e.fqn for e in entries if e.handling == MODULE_SWAP])
    report = SparsifyReport(
        lstms=entries, configs=cfg.to_list(), graph_rewrites=graph_rewrites,
        untraceable={k: v for k, v in tr.opaque.items()}, dropouts=dropouts, applied=applied,
        verification=verification,
    )
    report.details.update((display_fqn(k), v) for k, v in tr.details.items())
    return work, report


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


def _outputs(model: nn.Module, inputs: tuple, kwargs: Optional[dict] = None) -> list:
    """The tensors of ``model(*inputs)`` in eval() under no_grad, seeded, leaving no trace
    (Python state, train modes)."""
    from rnn_sparsify.passes.trace import PythonState

    state = PythonState(model)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            out = model(*inputs, **(kwargs or {}))
    finally:
        for m, t in modes.items():
            m.training = t
        state.restore()

    def flat(o):
        if isinstance(o, torch.Tensor):
            return [o.detach().clone()]
        if isinstance(o, PackedSequenceType):
            return flat(tuple(o))
        if isinstance(o, (tuple, list)):
            return [t for x in o for t in flat(x)]
        if isinstance(o, dict):
            return [t for k in sorted(o, key=str) for t in flat(o[k])]
        return []

    return flat(out)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y) or
                                                           torch.equal(x.isnan(), y.isnan()) and
                                                           torch.equal(x.nan_to_num(), y.nan_to_num()))
        for x, y in zip(a, b))


def _verify_graph_rewrites(work, example_inputs, pending, graph_rewrites, dropouts, sd, entries,
                           example_kwargs=None) -> dict:
    """Verification pass: the example inputs through ``work`` in eval() with each installed
    graph forward, against the same model running the original forwards. A graph whose
    forward changes the outputs is undone (original forward back, its cell regions removed,
    its fused dropouts unfused) and reported. Returns ``{"checked", "reverted"}``."""
    from rnn_sparsify.passes.find_lstm import display_fqn

    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    owners = [p[3] for p in pending]

    def run(active: set) -> list:
        for o in owners:
            o.__dict__["_rnn_sparsify_force_original"] = id(o) not in active
        try:
            return _outputs(work, inputs, example_kwargs)
        finally:
            for o in owners:
                o.__dict__.pop("_rnn_sparsify_force_original", None)

    reverted: dict[str, str] = {}
    try:
        ref = run(set())
        if _same(run({id(o) for o in owners}), ref):
            return {"checked": [display_fqn(p[0]) for p in pending], "reverted": reverted}
        for gfqn, undo, cells, owner, *_ in pending:
            if _same(run({id(owner)}), ref):
                continue
            why = "verification: with this rewritten forward the example inputs give other eval() outputs; undone"
            _revert_graph(owner, undo)
            reverted[display_fqn(gfqn)] = why
            graph_rewrites.pop(gfqn, None)
            for _, e in cells:
                e.handling, e.reason, e._sd, e._gs, e.configs, e.backend = SKIPPED, why, None, None, [], None
            for dd in dropouts:
                if dd.get("graph") == display_fqn(gfqn) and dd.get("fused"):
                    dd["fused"], dd["reason"] = False, why
            for e in entries:  # LSTMs that took over one of its dropouts: unfused again
                if e.fused_dropout and e.fused_dropout.get("graph") == display_fqn(gfqn):
                    e._sd, e.fused_dropout = sd, None
                    e.configs = [sd.to_dict() if c.get("kind") == StructuredDropout.kind else c for c in e.configs]
            warnings.warn(f"rnn_sparsify: {why} ({display_fqn(gfqn)})", RuntimeWarning, stacklevel=4)
    except Exception as err:  # noqa: BLE001 - example inputs that do not run were caught earlier
        return {"checked": [], "reverted": reverted, "error": f"{type(err).__name__}: {err}"}
    return {"checked": [display_fqn(p[0]) for p in pending], "reverted": reverted}


def _revert_graph(owner: nn.Module, undo: "_GraphUndo") -> None:
    """Give ``owner`` its original forward back and undo what its graph rewrite did."""
    base = getattr(owner, "_rnn_sparsify_base", None)
    if base is not None:
        owner.__class__ = base
    for k in [k for k in owner.__dict__ if k.startswith("_rnn_sparsify_")]:
        del owner.__dict__[k]
    undo.restore()


class _ModuleUndo:
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
            from .weight_sparsity import detach_weight_sparsity

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


class _GraphUndo:
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


def _fail(e: LSTMEntry, err: BaseException, errors: list[str]) -> None:
    from rnn_sparsify.passes.find_lstm import display_fqn

    e.handling = SKIPPED
    e.reason = f"error while handling it (skipped, model unchanged there): {type(err).__name__}: {err}"
    e._sd = e._gs = None
    e.fused_dropout = None
    e.weight_sparsity = None
    e.__dict__.pop("_region", None)
    e.__dict__.pop("_module", None)
    errors.append(f"{display_fqn(e.fqn)}: {type(err).__name__}: {err}")


def _rewrite_graph(work, gfqn, tg, cells, swapped, calls, sd, tr, undo: _GraphUndo) -> dict:
    """Rewrite the hand-written cells of one traced graph and fuse its dropouts; returns the
    dropout records and the forward to install (None if nothing changed)."""
    from rnn_sparsify.passes.find_lstm import display_fqn
    from rnn_sparsify.passes.fuse_dropout import find_dropout_feeds, fuse_dropout
    from rnn_sparsify.passes.rewrite import build_region, rewrite_cell

    owner = work.get_submodule(gfqn)
    changes: list[str] = []
    fused: list[tuple[str, Any]] = []
    dropouts: list[dict] = []
    regions = [(s, e, build_region(tg.gm, s.match)) for s, e in cells]
    remap: dict = {}
    targets: dict[str, LSTMEntry] = {}
    for k, (s, e, region) in enumerate(regions):
        m = s.match
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
        undo.added.append(name)
        targets[name] = e
        e.__dict__["_region"] = region
        changes.append(f"hand-written cell {display_fqn(s.fqn)}[{s.node}] -> {name}")

    def target_entry(node):
        if node.target in targets:
            return targets[node.target]
        return swapped.get(f"{gfqn}.{node.target}" if gfqn else node.target)

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
                undo.remember(mod)
                mod.structured_dropout = e._sd
                if isinstance(mod, nn.LSTM):
                    mod.dropout = 0.0  # NR dropout replaces the inter-layer dropout
                fused.append((f.target.target, sd))
            fuse_dropout(tg.gm, f)
    for _, e, region in regions:
        region.configure(e._sd, e._gs)
        e.__dict__.pop("_region", None)
    if not changes:
        return {"dropouts": dropouts, "pending": None}
    prefix = f"{gfqn}." if gfqn else ""
    covered = [k[len(prefix):] for k, v in (*tr.inlined.items(), *tr.leaves.items()) if v == gfqn]
    return {"dropouts": dropouts, "pending": (owner, tg.gm.graph, covered, tuple(fused), changes)}


def _rng_preserved(model):
    """The global torch RNG state (CPU and the CUDA devices of ``model``) is the same after
    ``sparsify`` as before: running ``example_inputs`` or a factory may draw from it, and a
    user's seeded run must not depend on whether it was sparsified."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda}) if isinstance(
        model, nn.Module) else []
    return torch.random.fork_rng(devices=devices)


def _never_passed(model: nn.Module, signatures: dict[int, set]) -> dict[int, frozenset]:
    """Per observed module, the optional ``forward`` parameters (default None) that no call
    of the example inputs passed, or passed as None: traced as None."""
    import inspect

    from rnn_sparsify.passes.rewrite import forward_params

    out: dict[int, frozenset] = {}
    for m in model.modules():
        sigs = signatures.get(id(m))
        if not sigs:
            continue
        names, plain = forward_params(m)
        if not plain:
            continue
        defaults = {n: p.default for n, p in inspect.signature(type(m).forward).parameters.items()}
        cand = {n for n in names if defaults.get(n, inspect.Parameter.empty) is None}
        for pos, kw in sigs:
            passed = {n for n, t in (*zip(names, pos), *kw) if t is not type(None)}
            cand -= passed
        if cand:
            out[id(m)] = frozenset(cand)
    return out


def _shared_reason(gm, node, calls: dict[int, int]) -> Optional[str]:
    """Why a dropout cannot be fused into the LSTM that ``node`` calls (None if it can):
    the fused dropout becomes the module's config, so it would apply to every call."""
    n = calls.get(id(gm.get_submodule(node.target)), 0)
    if n > 1:
        return (f"the LSTM is called {n} times; fusing would apply this dropout to every call "
                "(it is kept as written)")
    return None


def _is_lstm_call(gm, node) -> bool:
    from rnn_sparsify.passes.trace import is_lstm_like

    try:
        return is_lstm_like(gm.get_submodule(node.target))
    except AttributeError:
        return False


def sparsify(
    model: nn.Module,
    *configs,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    example_inputs=None,
    example_kwargs: Optional[dict] = None,
) -> nn.Module:
    """A sparse copy of ``model``; ``model`` itself is never modified.

    Args:
        model: any ``nn.Module`` (or an ``nn.LSTM`` itself).
        *configs: at least one, at most one each, of :class:`~rnn_sparsify.StructuredDropout`,
            :class:`~rnn_sparsify.GateGradientSparsity`, ``WeightSparsity`` (with none,
            ``TypeError``: use :func:`inspect_model` to look without changing anything).
        filter_fn: ``filter_fn(module, fqn) -> bool`` chooses the targets (the LSTM module,
            or for a hand-written cell the module that holds it); others are reported as
            skipped.
        example_inputs: a tuple of inputs (or one tensor); run in ``eval()`` under
            ``no_grad`` to record how many tokens each LSTM sees (report FLOPs), how each
            module is called (its traced forward is specialised and guarded accordingly),
            and to verify the rewritten forwards (see the module docstring).
        example_kwargs: keyword inputs of the same call (a dict), if the forward takes any.

    Returns the rewritten model with its :class:`SparsifyReport` as
    ``model.rnn_sparsify_report``. ``eval()`` gives the original numbers; ``state_dict()``
    keys are the original ones (plus mask buffers with ``WeightSparsity``).

    Raises:
        TypeError: no config, an unknown config type, or ``model`` is not a module.
        ValueError: two configs of one type; ``example_inputs`` that do not run.
        NoLSTMFoundError: nothing LSTM-like in the model.
        RuntimeError: every LSTM that was tried failed with an error (listed); an error
            while handling one LSTM otherwise only skips that LSTM (see the report).
    """
    _require_config(configs)
    with _rng_preserved(model):
        work, report = _run(model, configs, filter_fn, example_inputs, applied=True,
                            example_kwargs=example_kwargs)
    setattr(work, REPORT_ATTR, report)
    return work


def inspect_model(
    model: nn.Module,
    *configs,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    example_inputs=None,
    example_kwargs: Optional[dict] = None,
) -> SparsifyReport:
    """The report :func:`sparsify` would attach, leaving ``model`` untouched (dry run; configs
    are optional here)."""
    with _rng_preserved(model):
        _, report = _run(model, configs, filter_fn, example_inputs, applied=False,
                         example_kwargs=example_kwargs)
    return report
