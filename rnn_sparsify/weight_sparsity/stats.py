"""Inspection: per-matrix and per-gate sparsity, parameter and FLOP counts vs dense."""
from __future__ import annotations

from typing import Any

from torch import nn

from .config import GATES
from .masks import _check_module, _lstm_matrices, _mask_of
from .schedulers import _unwrap

# ---------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------
def weight_sparsity_stats(module: nn.Module) -> dict[str, Any]:
    """Per-matrix and per-gate sparsity of one LSTM, and its parameter / FLOP counts vs dense.

    For a masked matrix ``nnz`` counts its active (mask = 1) entries, the storage a sparse
    kernel needs (a regrown DST weight may still be exactly 0); for an unmasked one its
    non-zero entries. ``params`` covers every parameter of the module (biases included);
    ``flops`` the GEMM FLOPs per token summed over layers and directions (``2 * nnz`` of every
    weight matrix; element-wise gate math is not counted). Returns::

        {"method": "gradual" | "dst" | None, "config": dict | None,
         "matrices": [{"name", "kind", "layer", "direction", "shape", "masked",
                       "nnz", "numel", "sparsity", "gates": {"i", "f", "g", "o"} | None}],
         "params": {"dense", "nnz", "ratio"}, "flops": {"dense", "sparse", "ratio"}}
    """
    _check_module(module, "weight_sparsity_stats")
    cfg = getattr(module, "weight_sparsity", None)
    masked = set(getattr(module, "_weight_sparsity_params", ()))
    rows = []
    for mat in _lstm_matrices(module):
        w = getattr(module, mat.name)
        active = _mask_of(module, mat) if mat.name in masked else (w.detach() != 0)
        gates = None
        if mat.gated:
            per = active.reshape(4, mat.hidden, mat.cols)
            gates = {gn: 1.0 - float(per[i].sum()) / per[i].numel() for i, gn in enumerate(GATES)}
        nnz = int(active.sum())
        rows.append(
            {
                "name": mat.name, "kind": mat.kind, "layer": mat.layer, "direction": mat.direction,
                "shape": [mat.rows, mat.cols], "masked": mat.name in masked, "nnz": nnz,
                "numel": active.numel(), "sparsity": 1.0 - nnz / active.numel(), "gates": gates,
            }
        )
    mat_names = {r["name"] for r in rows}
    other = sum(p.numel() for n, p in module.named_parameters(recurse=False) if n not in mat_names)
    dense_w = sum(r["numel"] for r in rows)
    nnz_w = sum(r["nnz"] for r in rows)
    return {
        "method": cfg.method if cfg is not None else None,
        "config": cfg.to_dict() if cfg is not None else None,
        "matrices": rows,
        "params": {"dense": dense_w + other, "nnz": nnz_w + other, "ratio": (nnz_w + other) / (dense_w + other)},
        "flops": {"dense": 2 * dense_w, "sparse": 2 * nnz_w, "ratio": nnz_w / dense_w},
    }


def collect_weight_sparsity_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """:func:`weight_sparsity_stats` of every LSTM / LSTMCell of ``model``, by qualified name."""
    return {
        fqn: weight_sparsity_stats(m)
        for fqn, m in _unwrap(model).named_modules()
        if isinstance(m, (nn.LSTM, nn.LSTMCell))
    }


def format_weight_sparsity_stats(stats: dict[str, Any], name: str = "") -> str:
    """A plain-text table of :func:`weight_sparsity_stats` (for the report and ``inspect``)."""
    head = f"{name or 'LSTM'}: weight sparsity {stats['method'] or 'none'}"
    lines = [
        head,
        f"  {'matrix':<22} {'shape':>11} {'sparsity':>8}   {'i':>5} {'f':>5} {'g':>5} {'o':>5}",
    ]
    for r in stats["matrices"]:
        shape = "x".join(map(str, r["shape"]))
        gates = (
            " ".join(f"{r['gates'][g]:5.1%}" for g in GATES) if r["gates"] is not None else " ".join(["    -"] * 4)
        )
        mark = "" if r["masked"] else " (unmasked)"
        lines.append(f"  {r['name']:<22} {shape:>11} {r['sparsity']:8.1%}   {gates}{mark}")
    p, f = stats["params"], stats["flops"]
    lines.append(f"  params {p['nnz']:,} / {p['dense']:,} dense ({p['ratio']:.1%})")
    lines.append(f"  GEMM FLOPs/token {f['sparse']:,} / {f['dense']:,} dense ({f['ratio']:.1%})")
    return "\n".join(lines)
