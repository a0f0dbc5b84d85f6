"""The fx graphs of a model as a networkx graph and as Graphviz DOT, LSTMs highlighted.

One cluster per traced module (its fx nodes, dataflow edges); one dashed box per module
that could not be traced, with edges to the LSTMs found inside it. Colours: LSTM /
LSTMCell calls ``lightblue``, nodes of a matched hand-written cell ``palegreen``, a
dropout that would be fused ``khaki``, TorchScript modules ``lightgrey``. Nothing in the
model is changed (tracing runs on a copy).
"""
from __future__ import annotations

import copy
import textwrap

from torch import nn

from .find_lstm import display_fqn, find_lstms
from .fuse_dropout import dropout_source_of
from .trace import is_lstm_like, trace_degrading

__all__ = ["model_graph", "to_dot"]

LSTM_COLOR, CELL_COLOR, DROPOUT_COLOR, SCRIPT_COLOR = "lightblue", "palegreen", "khaki", "lightgrey"


def model_graph(model: nn.Module):
    """networkx ``DiGraph``: node attrs ``label``, ``cluster``, ``fillcolor``, ``style``."""
    import networkx as nx

    work = copy.deepcopy(model)
    tr = trace_degrading(work)
    sites = find_lstms(work, tr)
    cell_nodes = {}
    for s in sites:
        if s.match is not None:
            for n in s.match.nodes:
                cell_nodes[(s.graph_fqn, n.name)] = s.fqn
    G = nx.DiGraph(name="rnn_sparsify")
    for gfqn, tg in tr.graphs.items():
        cluster = f"{display_fqn(gfqn)} (traced)"
        for n in tg.gm.graph.nodes:
            key = f"{gfqn}/{n.name}"
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            attrs = {"label": f"{n.name}\n{n.op} {target}", "cluster": cluster}
            if n.op == "call_module":
                try:
                    sub = tg.gm.get_submodule(n.target)
                except AttributeError:
                    sub = None
                if sub is not None and is_lstm_like(sub):
                    attrs.update(fillcolor=LSTM_COLOR, style="filled", label=f"{n.name}\n{type(sub).__name__}")
                elif sub is not None and type(sub).__name__.endswith("ScriptModule"):
                    attrs.update(fillcolor=SCRIPT_COLOR, style="filled")
            if (gfqn, n.name) in cell_nodes:
                attrs.update(fillcolor=CELL_COLOR, style="filled")
            if dropout_source_of(tg.gm, n) and any(
                u.op == "call_module" and u.args and u.args[0] is n and _is_lstm(tg.gm, u) for u in n.users
            ):
                attrs.update(fillcolor=DROPOUT_COLOR, style="filled")
            G.add_node(key, **attrs)
            for a in n.all_input_nodes:
                G.add_edge(f"{gfqn}/{a.name}", key)
    for fqn, why in tr.opaque.items():
        text = "\n".join(textwrap.wrap(f"not traced: {why}", 72))  # complete, wrapped (never cut)
        G.add_node(f"opaque:{fqn}", label=f"{display_fqn(fqn)}\n{text}", style="dashed", cluster="")
    for s in sites:
        if s.graph_fqn is None and s.match is None:
            key = f"module:{s.fqn}"
            color = SCRIPT_COLOR if s.kind.startswith("TorchScript") else LSTM_COLOR
            G.add_node(key, label=f"{display_fqn(s.fqn)}\n{s.kind}", style="filled", fillcolor=color, cluster="")
            op = tr.nearest_opaque(s.fqn)
            if op is not None:
                G.add_edge(f"opaque:{op[0]}", key, style="dotted")
    return G


def _is_lstm(gm, node) -> bool:
    try:
        return is_lstm_like(gm.get_submodule(node.target))
    except AttributeError:
        return False


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(model: nn.Module) -> str:
    """Graphviz DOT text of :func:`model_graph` (render with ``dot -Tsvg``)."""
    G = model_graph(model)
    lines = ["digraph rnn_sparsify {", "  rankdir=TB;", '  node [shape=box, fontsize=10, fontname="monospace"];']
    clusters: dict[str, list[str]] = {}
    for n, a in G.nodes(data=True):
        clusters.setdefault(a.get("cluster", ""), []).append(n)

    def node_line(n, a, indent):
        attrs = ", ".join(f"{k}={_q(v)}" for k, v in a.items() if k != "cluster")
        return f"{indent}{_q(n)} [{attrs}];"

    for k, (name, nodes) in enumerate(sorted(clusters.items())):
        if name:
            lines.append(f"  subgraph cluster_{k} {{")
            lines.append(f"    label={_q(name)};")
            lines += [node_line(n, G.nodes[n], "    ") for n in nodes]
            lines.append("  }")
        else:
            lines += [node_line(n, G.nodes[n], "  ") for n in nodes]
    for u, v, a in G.edges(data=True):
        extra = f" [style={_q(a['style'])}]" if "style" in a else ""
        lines.append(f"  {_q(u)} -> {_q(v)}{extra};")
    lines.append("}")
    return "\n".join(lines) + "\n"
