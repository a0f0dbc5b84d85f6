"""Hand-written LSTM cells in a traced graph, matched with networkx.

What is matched (every part is checked; anything else inside the cell refuses the match)::

    pre  = P(x) + P(h) [+ b ...]        two projections summed (plus optional bias params),
         | P(cat([x, h]))               or one projection of a concatenation (either order);
                                        P is nn.Linear, F.linear, or mm/matmul with a
                                        (transposed) weight; optional norm around each P
                                        or around the sum (nn.LayerNorm, F.layer_norm,
                                        nn.RMSNorm, F.rms_norm)
    a, b, c_, d = gates of pre          chunk(4) / split(H) / split([H]*4) / pre[..., k*H:(k+1)*H]
                                        / narrow, on the last dimension, in ANY gate order
    i, f, o = sigmoid(.); g = tanh(.)   torch / F / Tensor-method / nn.Sigmoid, nn.Tanh
    c' = f*c + i*g                      operands of * and + in any order
    h' = o * tanh(c')  or  o * tanh(norm(c'))     (then c' := norm(c'), LayerNorm-LSTM)

The *core* (three sigmoids, two tanh, three products, the sum) is found as a subgraph
monomorphism (``networkx.algorithms.isomorphism.DiGraphMatcher``) of this pattern, on
dataflow edges only, so argument order does not matter::

    sig_i ──┐                 sig_f ──┐
    tanh_g ─┴─> mul_ig ──┐    c ──────┴─> mul_fc ──┐
                         └──────> add_c <──────────┘
                                    │ (norm_c)
                                    v
                 sig_o ──> mul_h <── tanh_c

The rest (gate slices, projections, x/h roles) is checked by plain code walking back from
the four activations. Refusals carry a reason (``CellRefusal``) so the report can say why a
cell-shaped subgraph was not rewritten.

Which projection input is ``h`` (the hidden state) and which is ``x``: (1) ``h`` comes from
the same tuple as ``c`` (``h, c = state``); (2) exactly one of the two is named like a hidden state
(``h``, ``hx``, ``h_prev``, ``hidden``, ...); (3) only one projection has ``in_features ==
hidden_size``; (4) ``h`` is the argument right before ``c`` (``forward(x, h, c)``).
Otherwise the match is refused. (If x and h have the same width, the cell math does not
depend on the choice; only which dropout, NR or RH, applies to which input does.)
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from .trace import ADD_TARGETS, MUL_TARGETS
from .user_code import node_location

__all__ = ["Projection", "CellMatch", "CellRefusal", "match_lstm_cells", "node_kind"]

_SIGMOID_FNS = (torch.sigmoid, F.sigmoid, torch.special.expit)
_TANH_FNS = (torch.tanh, F.tanh)
_NORM_FNS = (F.layer_norm,) + ((F.rms_norm,) if hasattr(F, "rms_norm") else ())
_NORM_MODULES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_MATMUL_FNS = (torch.mm, torch.matmul, operator.matmul)


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """Normalised op of ``node``: sigmoid, tanh, mul, add, norm, linear, matmul, other."""
    if node.op == "call_function":
        t = node.target
        if t in _SIGMOID_FNS:
            return "sigmoid"
        if t in _TANH_FNS:
            return "tanh"
        if t in MUL_TARGETS:
            return "mul"
        if t in ADD_TARGETS:
            return "add"
        if t in _NORM_FNS:
            return "norm"
        if t is F.linear:
            return "linear"
        if t in _MATMUL_FNS:
            return "matmul"
    elif node.op == "call_method":
        return {"sigmoid": "sigmoid", "tanh": "tanh", "mul": "mul", "add": "add",
                "mm": "matmul", "matmul": "matmul"}.get(node.target, "other")
    elif node.op == "call_module":
        m = _module(gm, node)
        if isinstance(m, nn.Sigmoid):
            return "sigmoid"
        if isinstance(m, nn.Tanh):
            return "tanh"
        if isinstance(m, _NORM_MODULES):
            return "norm"
        if type(m) is nn.Linear:
            return "linear"
    return "other"


def _is_plain_binary(node: fx.Node) -> bool:
    """``a + b`` / ``a * b`` with exactly two tensor operands and no alpha/out kwargs."""
    return len(node.args) == 2 and not node.kwargs


@dataclass
class Projection:
    """One GEMM feeding the gate pre-activation: ``out = inp @ W.T (+ bias)``.

    ``weight``/``bias`` are attribute paths relative to the graph root; ``layout`` is
    ``"out_in"`` (PyTorch ``(4H, in)``) or ``"in_out"`` (``(in, 4H)``, as in ``x @ W``).
    ``parts`` lists what the input is made of: ``["x"]``, ``["h"]``, ``["x", "h"]``, ...
    """

    node: fx.Node
    inp: fx.Node
    weight: str
    layout: str
    bias: Optional[str]
    parts: list[str] = field(default_factory=list)
    norm: Optional[fx.Node] = None


@dataclass
class CellMatch:
    """A hand-written LSTM cell found in a graph (see module docstring)."""

    scope: str  # module path (relative to the graph root) that holds the cell; "" = root
    x: fx.Node
    h: fx.Node
    c: fx.Node
    h_out: fx.Node
    c_out: fx.Node
    pre: fx.Node
    gate_order: str  # gate letter at each chunk position, e.g. "ifgo"
    input_size: int
    hidden_size: int
    projections: list[Projection]
    extra_biases: list[str]
    norms: list[str]  # human-readable: where normalisation sits
    nodes: list[fx.Node]  # every node of the cell, in graph order
    how_h_found: str

    @property
    def canonical(self) -> bool:
        """True if the math is exactly ``nn.LSTMCell``'s (no normalisation)."""
        return not self.norms

    def describe(self) -> str:
        projs = " + ".join(
            f"{'cat' if len(p.parts) > 1 else ''}{'(' + ','.join(p.parts) + ')'}@{p.weight}" for p in self.projections
        )
        norm = f", norms: {', '.join(self.norms)}" if self.norms else ""
        return f"gates {self.gate_order} from {projs}{norm}"


@dataclass
class CellRefusal:
    """A cell-shaped subgraph (the core matched) that was not accepted, with the reason."""

    scope: str
    anchor: str  # node name of h'
    reason: str
    location: str = ""  # file.py:line of h' in the user's code


# ---------------------------------------------------------------------------------------
# the core pattern
def _core_pattern(with_norm: bool):
    import networkx as nx

    p = nx.DiGraph()
    kinds = {
        "sig_i": "sigmoid", "sig_f": "sigmoid", "sig_o": "sigmoid", "tanh_g": "tanh",
        "c": "any", "mul_ig": "mul", "mul_fc": "mul", "add_c": "add", "tanh_c": "tanh", "mul_h": "mul",
    }
    if with_norm:
        kinds["norm_c"] = "norm"
    for n, k in kinds.items():
        p.add_node(n, kind=k)
    p.add_edges_from([
        ("sig_i", "mul_ig"), ("tanh_g", "mul_ig"),   # i * g
        ("sig_f", "mul_fc"), ("c", "mul_fc"),        # f * c
        ("mul_fc", "add_c"), ("mul_ig", "add_c"),    # c' = f*c + i*g
        ("tanh_c", "mul_h"), ("sig_o", "mul_h"),     # h' = o * tanh(c')
    ])
    if with_norm:
        p.add_edges_from([("add_c", "norm_c"), ("norm_c", "tanh_c")])
    else:
        p.add_edge("add_c", "tanh_c")
    return p


def _dataflow_graph(gm: fx.GraphModule):
    """networkx view of the graph restricted to what the core pattern can touch."""
    import networkx as nx

    g = nx.DiGraph()
    interesting = {"sigmoid", "tanh", "mul", "add", "norm"}
    kinds = {n: node_kind(gm, n) for n in gm.graph.nodes}
    for n, k in kinds.items():
        if k in interesting:
            g.add_node(n, kind=k)
            for a in n.all_input_nodes:
                if a not in g:
                    g.add_node(a, kind=kinds[a] if kinds[a] in interesting else "other")
                g.add_edge(a, n)
    return g


# ---------------------------------------------------------------------------------------
# gate slices
def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_last_dim(dim: Any) -> bool:
    return dim in (1, -1)


def _gate_source(node: fx.Node) -> Union[tuple[fx.Node, int, Optional[int]], str]:
    """(pre, position, width or None) if ``node`` is one of four gate slices of ``pre``."""
    if node.op == "call_function" and node.target is operator.getitem:
        src, idx = node.args
        if isinstance(src, fx.Node) and isinstance(idx, int):
            t, is_method = src.target, src.op == "call_method"
            if (is_method and t == "chunk") or (src.op == "call_function" and t is torch.chunk):
                n = _arg(src, 1, "chunks", None)
                dim = _arg(src, 2, "dim", 0)
                if n != 4:
                    return f"{src.name} chunks into {n}, not 4"
                if not _is_last_dim(dim):
                    return f"{src.name} chunks dim {dim}, not the feature dimension"
                return src.args[0], idx, None
            if (is_method and t == "split") or (src.op == "call_function" and t is torch.split):
                size = _arg(src, 1, "split_size_or_sections", _arg(src, 1, "split_size", None))
                dim = _arg(src, 2, "dim", 0)
                if not _is_last_dim(dim):
                    return f"{src.name} splits dim {dim}, not the feature dimension"
                if isinstance(size, (list, tuple)):
                    if len(size) != 4 or len(set(size)) != 1:
                        return f"{src.name} splits into {list(size)}, not four equal gates"
                    size = size[0]
                if not isinstance(size, int):
                    return f"{src.name} splits by a traced size"
                return src.args[0], idx, size
            if (is_method and t == "unbind") or (src.op == "call_function" and t is torch.unbind):
                return f"{src.name}: gates taken with unbind (reshape to (…, 4, H)) are not matched"
            return f"{node.name} indexes {src.name}, which is not chunk/split of the gates"
        if isinstance(src, fx.Node):
            sl = idx if isinstance(idx, tuple) else (idx,)
            # exactly one non-trivial slice, on the last dimension
            dims = [k for k, s in enumerate(sl) if s is not Ellipsis and s != slice(None)]
            if len(dims) != 1 or not isinstance(sl[dims[0]], slice) or sl[dims[0]].step not in (None, 1):
                return f"{node.name} slices {idx!r}, not one gate range"
            k = dims[0]
            last = sl[0] is Ellipsis and k == len(sl) - 1 or (k == 1 and len(sl) == 2)
            if not last:
                return f"{node.name} slices dimension {k}, not the feature dimension"
            s = sl[k]
            start, stop = s.start or 0, s.stop
            if not isinstance(start, int) or not (stop is None or isinstance(stop, int)):
                return f"{node.name} slices with traced bounds"
            return src, ("slice", start, stop), None  # resolved once all four are known
    if node.op in ("call_method", "call_function") and (node.target == "narrow" or node.target is torch.narrow):
        src, dim, start, length = (list(node.args) + [None] * 4)[:4]
        if isinstance(src, fx.Node) and _is_last_dim(dim) and isinstance(start, int) and isinstance(length, int):
            return src, ("slice", start, start + length), None
    return f"{node.name} is not a slice of a gate pre-activation"


def _resolve_positions(srcs: dict[str, tuple]) -> Union[tuple[fx.Node, dict[str, int]], str]:
    pres = {s[0] for s in srcs.values()}
    if len(pres) != 1:
        return "the four gates do not come from one pre-activation tensor"
    pre = pres.pop()
    pos: dict[str, int] = {}
    slices = {r: s[1] for r, s in srcs.items() if isinstance(s[1], tuple)}
    if slices:
        if len(slices) != 4:
            return "gates mix slicing with chunk/split"
        widths = {b - a for a, b in (v[1:] for v in slices.values()) if b is not None}
        if len(widths) != 1:
            return "gate slices have different widths"
        width = widths.pop()
        for r, (_, a, b) in slices.items():
            if a % width or (b is not None and b - a != width):
                return f"gate slice [{a}:{b}] is not aligned to the gate width {width}"
            pos[r] = a // width
    else:
        pos = {r: s[1] for r, s in srcs.items()}
    if sorted(pos.values()) != [0, 1, 2, 3]:
        return f"gate positions {sorted(pos.values())} are not a permutation of 0..3"
    return pre, pos


# ---------------------------------------------------------------------------------------
# projections
def _param_target(gm: fx.GraphModule, node: Any) -> Optional[str]:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            t = gm.get_parameter(node.target)
        except AttributeError:
            return None
        return node.target if isinstance(t, nn.Parameter) else None
    return None


def _transposed_param(gm: fx.GraphModule, node: Any) -> tuple[Optional[str], list[fx.Node]]:
    """``W.t()`` / ``W.T`` / ``W.transpose(0, 1)`` of a parameter -> (target, [nodes])."""
    if not isinstance(node, fx.Node):
        return None, []
    if node.op == "call_method" and node.target == "t" or (
        node.op == "call_function" and node.target is torch.t
    ):
        src = node.args[0]
    elif node.op == "call_function" and node.target is getattr and node.args[1] == "T":
        src = node.args[0]
    elif node.op in ("call_method", "call_function") and node.target in ("transpose", torch.transpose) and \
            tuple(node.args[1:3]) in ((0, 1), (1, 0), (-1, -2), (-2, -1)):
        src = node.args[0]
    else:
        return None, []
    t = _param_target(gm, src)
    return (t, [node, src]) if t else (None, [])


def _projection(gm: fx.GraphModule, node: fx.Node) -> Union[tuple[Projection, list[fx.Node]], str]:
    """Recognise a projection; returns it and the nodes it uses (get_attr/transposes)."""
    kind = node_kind(gm, node)
    if kind == "linear" and node.op == "call_module":
        m = _module(gm, node)
        return Projection(node, node.args[0], f"{node.target}.weight", "out_in",
                          f"{node.target}.bias" if m.bias is not None else None), []
    if kind == "linear":
        inp = node.args[0] if node.args else node.kwargs.get("input")
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        wt, bt = _param_target(gm, w), _param_target(gm, b) if b is not None else None
        if wt is None or (b is not None and bt is None):
            return f"{node.name}: F.linear weight/bias are not parameters of the model"
        return Projection(node, inp, wt, "out_in", bt), [w] + ([b] if b is not None else [])
    if kind == "matmul" and len(node.args) == 2:
        inp, w = node.args
        t = _param_target(gm, w)
        if t:
            return Projection(node, inp, t, "in_out", None), [w]
        t, used = _transposed_param(gm, w)
        if t:
            return Projection(node, inp, t, "out_in", None), used
        return f"{node.name}: matmul with a non-parameter right operand"
    return f"{node.name} ({kind}) is not a projection (nn.Linear, F.linear, mm/matmul with a weight)"


def _cat_parts(node: fx.Node) -> Optional[list[fx.Node]]:
    if node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.concatenate):
        seq = _arg(node, 0, "tensors", None)
        dim = _arg(node, 1, "dim", 0)
        if isinstance(seq, (list, tuple)) and len(seq) == 2 and _is_last_dim(dim) and \
                all(isinstance(s, fx.Node) for s in seq):
            return list(seq)
    return None


def _norm_params(gm: fx.GraphModule, node: fx.Node) -> tuple[list[fx.Node], Optional[str]]:
    """The get_attr nodes a functional norm uses; a reason if its params are not parameters."""
    used = []
    if node.op == "call_function":
        for a in list(node.args[2:]) + [node.kwargs.get("weight"), node.kwargs.get("bias")]:
            if isinstance(a, fx.Node):
                if _param_target(gm, a) is None:
                    return [], f"{node.name}: norm weight is not a parameter"
                used.append(a)
    return used, None


def _sum_terms(gm: fx.GraphModule, node: fx.Node, adds: list[fx.Node], root: bool = True) -> list[fx.Node]:
    """Flatten ``a + b + c`` (inner sums used only by the next sum) into its terms."""
    if node_kind(gm, node) == "add" and _is_plain_binary(node) and \
            all(isinstance(a, fx.Node) for a in node.args) and (root or len(node.users) == 1):
        adds.append(node)
        return _sum_terms(gm, node.args[0], adds, False) + _sum_terms(gm, node.args[1], adds, False)
    return [node]


# ---------------------------------------------------------------------------------------
def _common_scope(nodes: list[fx.Node]) -> str:
    paths = []
    for n in nodes:
        stack = n.meta.get("nn_module_stack") or {}
        paths.append([v[0] if isinstance(v, tuple) else str(v) for v in stack.values()])
    common: list[str] = []
    for level in zip(*paths):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return common[-1] if common else ""


def _verify(gm: fx.GraphModule, m: dict[str, fx.Node], recurrent_weights: frozenset = frozenset()
            ) -> Union[CellMatch, str]:
    roles = {"i": m["sig_i"], "f": m["sig_f"], "g": m["tanh_g"], "o": m["sig_o"]}
    for name in ("mul_ig", "mul_fc", "add_c", "mul_h"):
        if not _is_plain_binary(m[name]):
            return f"{m[name].name} has extra arguments (alpha=/out=)"
    for r, act in roles.items():
        if len(act.all_input_nodes) != 1 or len(act.args) != 1 or act.kwargs:
            return f"gate {r} activation {act.name} takes extra arguments"
    # gate slices -------------------------------------------------------------------
    srcs = {}
    for r, act in roles.items():
        s = _gate_source(act.args[0])
        if isinstance(s, str):
            return f"gate {r}: {s}"
        srcs[r] = s
    resolved = _resolve_positions(srcs)
    if isinstance(resolved, str):
        return resolved
    pre, pos = resolved
    order = "".join(sorted(pos, key=pos.get))
    c_out = m.get("norm_c", m["add_c"])
    h_out = m["mul_h"]
    c = m["c"]
    explained: set[fx.Node] = {m[k] for k in m if k != "c"}
    for r, act in roles.items():
        explained.add(act.args[0])
        src = act.args[0].args[0]
        if src is not pre:
            explained.add(src)  # the chunk/split node
    explained.add(pre)
    # pre-activation: [norm](sum of [norm](projection) and biases) ----------------------
    norms: list[str] = []
    base = pre
    if node_kind(gm, pre) == "norm":
        used, why = _norm_params(gm, pre)
        if why:
            return why
        explained.update(used)
        norms.append(f"{pre.name} on the gate sum")
        base = pre.args[0]
        explained.add(base)
    adds: list[fx.Node] = []
    terms = _sum_terms(gm, base, adds)
    explained.update(adds)
    projections: list[Projection] = []
    extra_biases: list[str] = []
    for t in terms:
        if _param_target(gm, t):
            extra_biases.append(t.target)
            explained.add(t)
            continue
        norm = None
        if node_kind(gm, t) == "norm":
            used, why = _norm_params(gm, t)
            if why:
                return why
            explained.update(used)
            norm, t = t, t.args[0]
            explained.add(norm)
        got = _projection(gm, t)
        if isinstance(got, str):
            return f"gate pre-activation term: {got}"
        proj, used = got
        proj.norm = norm
        if norm is not None:
            norms.append(f"{norm.name} on projection {t.name}")
        explained.add(t)
        explained.update(used)
        projections.append(proj)
    # inputs: which is x, which is h --------------------------------------------------
    if len(projections) == 1:
        parts = _cat_parts(projections[0].inp)
        if parts is None:
            return "single projection whose input is not cat([x, h]) on the feature dimension"
        explained.add(projections[0].inp)
        cands = parts
    elif len(projections) == 2:
        cands = [p.inp for p in projections]
        if cands[0] is cands[1]:
            return "both projections read the same tensor"
    else:
        return f"{len(projections)} projections feed the gates (expected 2, or 1 on a concatenation)"
    hidden4 = None
    for p in projections:
        w = gm.get_parameter(p.weight)
        out = w.shape[0] if p.layout == "out_in" else w.shape[1]
        if w.dim() != 2 or (hidden4 is not None and out != hidden4):
            return f"projection weights {p.weight} have inconsistent gate widths"
        hidden4 = out
    if hidden4 % 4:
        return f"gate width {hidden4} is not 4 * hidden_size"
    H = hidden4 // 4
    for r, sr in srcs.items():
        if sr[2] is not None and sr[2] != H:
            return f"gate {r} is split with size {sr[2]}, not hidden_size={H}"
        if isinstance(sr[1], tuple) and sr[1][2] is not None and sr[1][2] - sr[1][1] != H:
            return f"gate {r} slice has width {sr[1][2] - sr[1][1]}, not hidden_size={H}"
    h_node, how = _which_is_h(gm, cands, c, projections, H, recurrent_weights)
    if h_node is None:
        return how
    x_node = cands[1] if h_node is cands[0] else cands[0]
    for p in projections:
        if len(projections) == 1:
            p.parts = ["x" if n is x_node else "h" for n in cands]
        else:
            p.parts = ["h" if p.inp is h_node else "x"]
    # sizes -------------------------------------------------------------------------
    if len(projections) == 1:
        w = gm.get_parameter(projections[0].weight)
        total_in = w.shape[1] if projections[0].layout == "out_in" else w.shape[0]
        I = total_in - H
        if I <= 0:
            return f"concatenated projection has {total_in} inputs, not more than hidden_size={H}"
    else:
        px = next(p for p in projections if p.parts == ["x"])
        ph = next(p for p in projections if p.parts == ["h"])
        wx, wh = gm.get_parameter(px.weight), gm.get_parameter(ph.weight)
        I = wx.shape[1] if px.layout == "out_in" else wx.shape[0]
        hin = wh.shape[1] if ph.layout == "out_in" else wh.shape[0]
        if hin != H:
            return f"recurrent projection {ph.weight} takes {hin} inputs, not hidden_size={H}"
    for b in extra_biases + [p.bias for p in projections if p.bias]:
        if tuple(gm.get_parameter(b).shape) != (4 * H,):
            return f"bias {b} has shape {tuple(gm.get_parameter(b).shape)}, not ({4 * H},)"
    if "norm_c" in m:
        used, why = _norm_params(gm, m["norm_c"])
        if why:
            return why
        explained.update(used)
        norms.append(f"{m['norm_c'].name} on the cell state")
    # closure: every node between the inputs and (h', c') is explained ------------------
    boundary = {x_node, h_node, c}
    region: set[fx.Node] = set()
    stack = [h_out, c_out]
    while stack:
        n = stack.pop()
        if n in region or n in boundary:
            continue
        if n not in explained:
            return f"unexpected op {n.name} ({n.op} {getattr(n.target, '__name__', n.target)}) inside the cell"
        region.add(n)
        stack.extend(n.all_input_nodes)
    for n in region:
        if n in (h_out, c_out) or n.op == "get_attr":
            continue
        outside = [u for u in n.users if u not in region]
        if outside:
            return f"intermediate {n.name} is also used outside the cell (by {outside[0].name})"
    nodes = [n for n in gm.graph.nodes if n in region]
    core = [m[k] for k in ("sig_i", "sig_f", "sig_o", "tanh_g", "mul_ig", "mul_fc", "add_c", "mul_h")]
    return CellMatch(
        scope=_common_scope(core), x=x_node, h=h_node, c=c, h_out=h_out, c_out=c_out, pre=pre,
        gate_order=order, input_size=I, hidden_size=H, projections=projections,
        extra_biases=extra_biases, norms=norms, nodes=nodes, how_h_found=how,
    )


_H_NAME = re.compile(r"^(h|hx|h_t|h_prev|prev_h|h0|hidden|hid)(_\d+)?$")


def _root_name(n: fx.Node) -> str:
    return str(n.target) if n.op == "placeholder" else n.name


def _which_is_h(gm, cands: list[fx.Node], c: fx.Node, projections: list[Projection], H: int,
                recurrent_weights: frozenset = frozenset()):
    a, b = cands

    def tuple_src(n: fx.Node):
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            return n.args[0], n.args[1]
        return None

    ts_c = tuple_src(c)
    if ts_c is not None:
        for n in cands:
            ts = tuple_src(n)
            if ts is not None and ts[0] is ts_c[0]:
                return n, f"h comes from the same tuple as c ({ts_c[0].name})"
    named = [n for n in cands if _H_NAME.match(_root_name(n))]
    if len(named) == 1:
        return named[0], f"h is named {_root_name(named[0])!r}"
    if len(projections) == 2:
        ins = []
        for p in projections:
            w = gm.get_parameter(p.weight)
            ins.append(w.shape[1] if p.layout == "out_in" else w.shape[0])
        if ins.count(H) == 1:
            return cands[ins.index(H)], "only the recurrent projection has hidden_size inputs"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if c in placeholders:
        k = placeholders.index(c)
        if k > 0 and placeholders[k - 1] in cands:
            return placeholders[k - 1], "h is the argument right before c"
    # an unrolled loop: the previous step's h' = o * tanh(c) of this step's c
    prev = [n for n in cands if node_kind(gm, n) == "mul" and any(
        isinstance(a, fx.Node) and node_kind(gm, a) == "tanh" and a.args and a.args[0] is c for a in n.args)]
    if len(prev) == 1:
        return prev[0], "h is the previous step's h' = o * tanh(c) (unrolled loop)"
    if len(projections) == 2 and recurrent_weights:
        rec = [p.inp for p in projections if p.weight in recurrent_weights]
        if len(rec) == 1:
            return rec[0], "h is the input of the recurrent projection (as at the other unrolled steps)"
    return None, (
        "cannot tell the input x from the hidden state h (h is not passed with c, and "
        "input_size == hidden_size)"
    )


def match_lstm_cells(gm: fx.GraphModule, recurrent_weights=None) -> tuple[list[CellMatch], list[CellRefusal]]:
    """All hand-written LSTM cells of ``gm`` (non-overlapping) and the refused candidates.
    ``recurrent_weights``: parameter targets known to be recurrent projections (from other
    steps of an unrolled loop); they tell h from x where nothing else does."""
    recurrent_weights = frozenset(recurrent_weights or ())
    kinds = {node_kind(gm, n) for n in gm.graph.nodes}
    if not {"sigmoid", "tanh", "mul", "add"} <= kinds:
        return [], []
    from networkx.algorithms.isomorphism import DiGraphMatcher

    g = _dataflow_graph(gm)
    found: dict[fx.Node, CellMatch] = {}
    refused: dict[fx.Node, CellRefusal] = {}
    taken: set[fx.Node] = set()
    for with_norm in (True, False):
        pat = _core_pattern(with_norm)
        matcher = DiGraphMatcher(
            g, pat, node_match=lambda gn, pn: pn["kind"] == "any" or gn["kind"] == pn["kind"]
        )
        for mapping in matcher.subgraph_monomorphisms_iter():
            m = {p: n for n, p in mapping.items()}
            anchor = m["mul_h"]
            if anchor in found:
                continue
            got = _verify(gm, m, recurrent_weights)
            if isinstance(got, CellMatch):
                if taken & set(got.nodes):
                    continue
                found[anchor] = got
                taken |= set(got.nodes)
                refused.pop(anchor, None)
            elif anchor not in refused:
                refused[anchor] = CellRefusal(_common_scope([anchor]), anchor.name, got)
    for r in _lstm_like_refusals(gm, set(found) | set(refused) | taken):
        refused[r.anchor] = r
    by_name = {n.name: n for n in gm.graph.nodes}
    for r in refused.values():
        r.location = r.location or node_location(by_name[r.anchor])
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    matches = sorted(found.values(), key=lambda cm: order[cm.h_out])
    return matches, sorted(refused.values(), key=lambda r: r.anchor)


# ---------------------------------------------------------------------------------------
# LSTM-like variants the core pattern does not see
def _describe(gm: fx.GraphModule, n: Any) -> str:
    if not isinstance(n, fx.Node):
        return repr(n)
    kind = node_kind(gm, n)
    what = kind if kind != "other" else getattr(n.target, "__name__", str(n.target))
    loc = node_location(n)
    return f"{n.name} (a {what}{' at ' + loc if loc else ''})"


def _chunks_of(gm: fx.GraphModule, act: fx.Node) -> Optional[int]:
    """``N`` if the activation's input is a piece of ``chunk(N)``/``split`` into N (else None)."""
    src = act.args[0] if act.args and isinstance(act.args[0], fx.Node) else None
    if src is None or src.op != "call_function" or src.target is not operator.getitem:
        return None
    ch = src.args[0]
    if isinstance(ch, fx.Node) and getattr(ch.target, "__name__", ch.target) in ("chunk", "tensor_split"):
        n = _arg(ch, 1, "chunks", None) if ch.op == "call_function" else (ch.args[1] if len(ch.args) > 1 else ch.kwargs.get("chunks"))
        return n if isinstance(n, int) else None
    return None


def _lstm_like_refusals(gm: fx.GraphModule, known: set) -> list[CellRefusal]:
    """Cells shaped like ``h' = o * tanh(a*b + c*d)`` that the core pattern did not match
    (coupled gates such as ``f = 1 - i``, gates chunked in three, a gate that is not a
    sigmoid): each with the gate where the match stopped."""
    out = []
    for n in gm.graph.nodes:
        if n in known or node_kind(gm, n) != "mul" or not _is_plain_binary(n):
            continue
        ops = list(n.args)
        if not all(isinstance(a, fx.Node) for a in ops):
            continue
        for k, t in enumerate(ops):
            extra_term = None
            if node_kind(gm, t) == "add" and _is_plain_binary(t):  # h' = o * (tanh(c') + r)
                inner = [a for a in t.args if isinstance(a, fx.Node) and node_kind(gm, a) == "tanh"]
                if len(inner) == 1:
                    extra_term, t = t, inner[0]
            if node_kind(gm, t) != "tanh" or not t.args or not isinstance(t.args[0], fx.Node):
                continue
            cn = t.args[0]
            if node_kind(gm, cn) == "norm" and cn.args and isinstance(cn.args[0], fx.Node):
                cn = cn.args[0]
            if node_kind(gm, cn) != "add" or not _is_plain_binary(cn):
                continue
            prods = list(cn.args)
            if not all(isinstance(p, fx.Node) and node_kind(gm, p) == "mul" and _is_plain_binary(p) for p in prods):
                continue
            reason = _first_gate_problem(gm, ops[1 - k], prods)
            if reason is None and extra_term is not None:
                reason = (f"hidden output h': {n.name} = o * ({extra_term.name}: tanh(c') plus another term"
                          f"{' at ' + node_location(extra_term) if node_location(extra_term) else ''}), "
                          "not o * tanh(c')")
            if reason is not None:
                out.append(CellRefusal(_common_scope([n]), n.name, reason))
            break
    return out


def _first_gate_problem(gm: fx.GraphModule, o: fx.Node, prods: list[fx.Node]) -> Optional[str]:
    """The first gate of ``h' = o * tanh(c')``, ``c' = f*c + i*g`` that is not LSTM math."""
    sig = [a for p in prods for a in p.args if isinstance(a, fx.Node) and node_kind(gm, a) == "sigmoid"]
    chunked = {c for c in (_chunks_of(gm, a) for a in sig + ([o] if node_kind(gm, o) == "sigmoid" else [])) if c}
    extra = (f"; its gates come from chunk({min(chunked)}), an LSTM cell has 4 gate slices (i, f, g, o)"
             if chunked and 4 not in chunked else "")
    if node_kind(gm, o) != "sigmoid":
        return f"output gate o: h' = o * tanh(c') with o = {_describe(gm, o)}, not a sigmoid{extra}"
    ig = [p for p in prods if any(isinstance(a, fx.Node) and node_kind(gm, a) == "tanh" for a in p.args)]
    if not ig:
        return f"candidate g: neither product of c' = {prods[0].name} + {prods[1].name} has a tanh operand{extra}"
    ig = ig[0]
    fc = prods[1] if ig is prods[0] else prods[0]
    i = next(a for a in ig.args if not (isinstance(a, fx.Node) and node_kind(gm, a) == "tanh"))
    if not (isinstance(i, fx.Node) and node_kind(gm, i) == "sigmoid"):
        return f"input gate i: i * tanh(g) with i = {_describe(gm, i)}, not a sigmoid{extra}"
    if not any(isinstance(a, fx.Node) and node_kind(gm, a) == "sigmoid" for a in fc.args):
        f = fc.args[0] if fc.args[0] is not i else fc.args[1]
        return (f"forget gate f: c' = f * c + i * g with f = {_describe(gm, f)}, not a sigmoid of its own gate slice "
                f"(coupled input/forget gates, e.g. f = 1 - i, are another cell){extra}")
    return None  # LSTM-shaped: the core pattern saw it (matched or refused with its own reason)
