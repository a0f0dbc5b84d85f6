"""Static launch facts of the indexed GEMMs an LSTM compiles to: grid (CTAs) and serial K
stages per CTA, from the specs and their tiles alone (no TVM, no GPU).

    python -m rnn_sparsify.codegen.launch_report            # the README's shapes
    launch_rows(LSTMSpec(...))                               # one row per GEMM

A per-step kernel (``T = 1``: ``fwd_recurrent``, the ``dh`` ``bwd_data``) runs once per time
step and layer; with fewer CTAs than the GPU has SMs, most SMs idle while it runs.
"""
from __future__ import annotations

from .lstm_spec import LSTMSpec

SMS = {"sm_80": 108, "sm_90": 132}


def launch_rows(spec: LSTMSpec) -> list[dict]:
    """One dict per GEMM of ``spec``: method, T, (M, N, K), tile, split_k, CTAs, K stages."""
    rows = []
    for method, g in spec.gemms():
        t = g.tile
        rows.append({
            "method": method, "kind": g.kind, "T": g.T, "mnk": g.mnk,
            "tile": f"{t.bm}x{t.bn}x{t.bk}/{t.warps_m}x{t.warps_n}", "split_k": getattr(t, "split_k", 1),
            "ctas": g.ctas, "k_stages": g.k_stages, "per_step": g.T == 1,
        })
    return rows


def readme_specs() -> dict[str, LSTMSpec]:
    """The README's models: 2x650 and 2x1500, batch 20 and 64, keep 0.5, bf16, 35 steps
    (layer 2's input is H, layer 1's the embedding of size H: one GEMM list serves both)."""
    out = {}
    for H in (650, 1500):
        for B in (20, 64):
            out[f"{H}/B{B}"] = LSTMSpec(input_size=H, hidden_size=H, batch=B, seq_len=35, num_layers=2,
                                        dtype="bfloat16",
                                        structured_dropout={"p_input": 0.5, "p_recurrent": 0.5})
    return out


def report(sms: int = SMS["sm_90"]) -> str:
    lines = [f"{'model':10} {'method':14} {'T':>3} {'M x N x K':>18} {'tile':>14} {'split':>5} "
             f"{'CTAs':>6} {'K-stages':>8}  CTAs/SM ({sms} SMs)"]
    for name, spec in readme_specs().items():
        for r in launch_rows(spec):
            M, N, K = r["mnk"]
            lines.append(f"{name:10} {r['method']:14} {r['T']:>3} {f'{M}x{N}x{K}':>18} {r['tile']:>14} "
                         f"{r['split_k']:>5} {r['ctas']:>6} {r['k_stages']:>8}  {r['ctas'] / sms:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
