"""Find every LSTM-like thing in a model, traced or not.

Sources, in the order they are reported:

(a) ``nn.LSTM`` and subclasses and (b) ``nn.LSTMCell`` and subclasses: found by walking
    ``named_modules`` — so also below modules that could not be traced (they are swapped in
    place, no graph needed). A module registered under several names is one site.
(c) hand-written cells in every traced graph (:mod:`.match_cell`), and the refused
    cell-shaped candidates with the reason.
(e) TorchScript modules: one skipped site each, naming the LSTMs compiled inside.

Sites that are known not to be rewritable carry ``refusal`` already (TorchScript, already
sparse, a subclass whose forward bypasses ``super().forward``).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from rnn_sparsify.modules import SparseMixin

from .match_cell import CellMatch, match_lstm_cells
from .rewrite import base_forward_problem
from .trace import TraceResult, is_lstm_like, is_scripted, is_sparse_region

__all__ = ["LSTMSite", "find_lstms", "module_shapes", "display_fqn", "explicit_base_calls", "probable_layers",
           "PROBABLE_LAYER"]


from rnn_sparsify.report import display_fqn  # noqa: E402,F401 - one definition, re-exported here


@dataclass
class LSTMSite:
    fqn: str
    kind: str
    shapes: dict
    location: str
    module: Optional[nn.Module] = None
    graph_fqn: Optional[str] = None  # traced graph holding the call / the cell
    match: Optional[CellMatch] = None
    refusal: Optional[str] = None
    aliases: list[str] = field(default_factory=list)  # other names of the same module
    node: Optional[str] = None  # node name of h' for hand-written cells
    layer: Optional[object] = None  # CapturedLayer of a hand-written layer (passes/capture.py)


def module_shapes(m: nn.Module) -> dict:
    if isinstance(m, nn.LSTM):
        return {"input_size": m.input_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
                "bidirectional": m.bidirectional, "proj_size": m.proj_size, "batch_first": m.batch_first,
                "bias": m.bias, "dropout": m.dropout}
    if isinstance(m, nn.LSTMCell):
        return {"input_size": m.input_size, "hidden_size": m.hidden_size, "bias": m.bias}
    return {}


def _location(tr: TraceResult, fqn: str) -> str:
    from .user_code import node_location

    g = tr.graph_of(fqn)
    if g is not None:
        rel = fqn[len(g.fqn) + 1:] if g.fqn else fqn
        lines = sorted({node_location(n) for n in g.gm.graph.nodes
                        if n.op == "call_module" and n.target == rel and node_location(n)})
        at = f" at {', '.join(lines)}" if lines else ""
        return f"called from the traced graph of {display_fqn(g.fqn)}{at}"
    op = tr.nearest_opaque(fqn)
    if op is not None:
        return f"inside untraceable {display_fqn(op[0])} ({op[1]})"
    return "not called from any traced graph"


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else (a or b)


_EXPLICIT_BASE = re.compile(r"\b((?:nn\.)?(?:LSTM|LSTMCell|RNNBase|RNNCellBase)\.forward)\(\s*\w+\.(\w+)\b")


def explicit_base_calls(model: nn.Module) -> dict[int, str]:
    """LSTMs that some module's code runs as ``nn.LSTM.forward(self.<name>, ...)``: id -> reason.

    Such a call names ``nn.LSTM.forward`` itself, so it runs the dense code whatever the
    module's class is; no swap can reach it (it is not intercepted: doing so would mean
    patching ``nn.LSTM.forward`` or ``torch._VF`` for every LSTM in the process). These
    LSTMs are skipped with this reason instead of being reported as sparse.
    """
    out: dict[int, str] = {}
    for fqn, m in model.named_modules():
        cls = getattr(type(m), "_rnn_sparsify_base", type(m))
        if cls.__module__.startswith("torch."):
            continue
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for call, name in _EXPLICIT_BASE.findall(src):
            sub = m._modules.get(name)
            if isinstance(sub, (nn.LSTM, nn.LSTMCell)) and id(sub) not in out:
                out[id(sub)] = (f"{display_fqn(fqn)} ({cls.__name__}) runs it as {call}(self.{name}, ...), which "
                                f"calls the dense implementation by name and bypasses the sparse one; "
                                f"call self.{name}(...) instead")
    return out


_LAYER_HINTS = (re.compile(r"\bsigmoid\b"), re.compile(r"\btanh\b"),
                re.compile(r"\.(chunk|split|narrow|unbind)\(|\[[^\]]*:[^\]]*\]"), re.compile(r"\bfor\b|\bwhile\b"))
PROBABLE_LAYER = "hand-written LSTM layer (probable)"


def probable_layers(model: nn.Module, tr: TraceResult, found: set[str]) -> list[LSTMSite]:
    """Untraceable modules whose forward reads like a hand-written LSTM layer (a loop with
    sigmoid, tanh and a gate split) and that hold no LSTM found otherwise: reported, since
    they cannot be matched without a graph (capturing them by running them is not done)."""
    out = []
    for fqn, why in tr.opaque.items():
        m = model.get_submodule(fqn)
        if any(f == fqn or f.startswith(fqn + ".") if fqn else True for f in found):
            continue
        cls = getattr(type(m), "_rnn_sparsify_base", type(m))
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if all(p.search(src) for p in _LAYER_HINTS):
            out.append(LSTMSite(
                fqn, PROBABLE_LAYER, {}, f"untraceable: {why}", module=m,
                refusal=("its forward reads like a hand-written LSTM layer (a time loop with sigmoid, tanh and gate "
                         "slices) in code torch.fx cannot trace; it is not rewritten (no graph to match it in). Move "
                         "the cell step into its own module (the loop outside it) so that it traces"),
            ))
    return out


def find_lstms(model: nn.Module, tr: TraceResult) -> list[LSTMSite]:
    sites: list[LSTMSite] = []
    names: dict[int, list[str]] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(fqn)
    seen: set[int] = set()
    scripted_done: list[str] = []
    explicit = explicit_base_calls(model)
    for fqn, m in model.named_modules():
        if any(fqn == s or fqn.startswith(s + ".") for s in scripted_done):
            continue
        if is_scripted(m):
            inner = [n or "<self>" for n, sub in m.named_modules()
                     if getattr(sub, "original_name", "") in ("LSTM", "LSTMCell")]
            kind = "TorchScript module" + (f" (compiled {getattr(m, 'original_name', '')})" if inner == ["<self>"] else "")
            why = ("TorchScript module: its compiled code cannot be traced or rewritten; sparsify the eager "
                   "module instead (the sparse modules train in eager mode and cannot themselves be scripted: "
                   "script the original model for inference)")
            if inner and inner != ["<self>"]:
                why += f" (contains LSTMs at {', '.join(inner)})"
            sites.append(LSTMSite(fqn, kind, {}, _location(tr, fqn), module=m, refusal=why))
            scripted_done.append(fqn)
            continue
        if is_sparse_region(m) and id(m) not in seen:
            seen.add(id(m))
            shapes = {"input_size": m.input_size, "hidden_size": m.hidden_size, "gate_order": m.gate_order}
            sites.append(LSTMSite(
                fqn, "hand-written cell (already sparse)", shapes, _location(tr, fqn), module=m,
                refusal=(f"already sparse: rewritten by an earlier sparsify ({m.extra_repr()}); "
                         "sparsify the original model again instead"),
            ))
            continue
        if not is_lstm_like(m) or id(m) in seen:
            continue
        seen.add(id(m))
        base = "nn.LSTM" if isinstance(m, nn.LSTM) else "nn.LSTMCell"
        kind = base if type(m) in (nn.LSTM, nn.LSTMCell) else f"{base} subclass {type(m).__name__}"
        refusal = None
        if isinstance(m, SparseMixin):
            refusal = f"already sparse ({type(m).__name__}); call to_dense() before sparsify again"
        elif id(m) in explicit:
            refusal = explicit[id(m)]
        elif type(m) not in (nn.LSTM, nn.LSTMCell):
            refusal = base_forward_problem(type(m))
        g = tr.graph_of(fqn)
        sites.append(LSTMSite(
            fqn, kind, module_shapes(m), _location(tr, fqn), module=m,
            graph_fqn=g.fqn if g is not None else None, refusal=refusal,
            aliases=[n for n in names[id(m)] if n != fqn],
        ))
    for gfqn, tg in tr.graphs.items():
        matches, refused = match_lstm_cells(tg.gm)
        for cm in matches:
            fqn = _join(gfqn, cm.scope)
            shapes = {"input_size": cm.input_size, "hidden_size": cm.hidden_size, "gate_order": cm.gate_order,
                      "normalisation": cm.norms}
            sites.append(LSTMSite(
                fqn, "hand-written cell", shapes, f"in the traced graph of {display_fqn(gfqn)}",
                module=model.get_submodule(fqn), graph_fqn=gfqn, match=cm, node=cm.h_out.name,
                refusal=None if tg.mode_independent else f"graph rewrite refused: {tg.mode_reason}",
            ))
        for r in refused:
            fqn = _join(gfqn, r.scope)
            sites.append(LSTMSite(
                fqn, "hand-written cell (candidate)", {}, f"in the traced graph of {display_fqn(gfqn)}",
                module=model.get_submodule(fqn), graph_fqn=gfqn, node=r.anchor,
                refusal=(f"LSTM-like cell{' at ' + r.location if r.location else ''} not rewritten: {r.reason}. "
                         "Done instead: it runs as written (dense, no structured dropout or gate sparsity). What you "
                         "can do: write it as the standard cell (4 gate slices, sigmoid i/f/o, tanh g, c' = f*c + i*g, "
                         "h' = o*tanh(c'); see docs/passes.md) or use nn.LSTMCell"),
            ))
    sites += probable_layers(model, tr, {s.fqn for s in sites})
    return sites
