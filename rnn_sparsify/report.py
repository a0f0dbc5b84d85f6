"""The :class:`SparsifyReport` of :func:`rnn_sparsify.sparsify`: what was found, what was done
and why, per LSTM, and the GEMM FLOPs dense vs sparse. Plain data: the passes
(:mod:`rnn_sparsify.passes.pipeline`) fill it, the API module and the command line read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from .config import GateGradientSparsity, StructuredDropout, kept_count

__all__ = ["SparsifyReport", "LSTMEntry", "get_report", "NoLSTMFoundError", "flops_per_token", "display_fqn",
           "GRAPH_REWRITE", "MODULE_SWAP", "SKIPPED", "REPORT_ATTR", "PHASES"]

GRAPH_REWRITE = "graph rewrite"
MODULE_SWAP = "module swap"
SKIPPED = "skipped"
REPORT_ATTR = "rnn_sparsify_report"
PHASES = ("forward", "backward_data", "weight_gradient")


class NoLSTMFoundError(LookupError):
    """The model holds no LSTM, LSTMCell or hand-written LSTM cell."""



def display_fqn(fqn: str) -> str:
    return fqn if fqn else "<root>"


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
