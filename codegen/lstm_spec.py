"""Which indexed GEMMs an LSTM needs: from a model or an LSTM description to kernel specs.

The mapping follows the GEMMs of :class:`rnn_sparsify.kernels.reference.ReferenceBackend`
(the methods the sparse autograd Functions call), per layer and direction, with
``I`` = layer input size, ``H`` = hidden size, ``B`` = batch, ``T`` = sequence length,
``k_in``/``k_h`` = kept input/hidden units per step (structured dropout) and ``kc`` = kept
``dnet`` columns (coarse / meProp gate-gradient sparsity):

==================  ===============================================  =====================
method              GEMM                                             spec
==================  ===============================================  =====================
``fwd_input``       (T,B,I)[kept] @ W_ih[:, kept].T                  GatherRowsT(T, B, 4H, I, k_in)
``fwd_recurrent``   (B,H)[kept] @ W_hh[:, kept].T                    GatherK(1, B, 4H, H, k_h)
``bwd_data`` (dx)   (T,B,kc) @ W_ih[g_cols][:, kept]                 GatherKN(T, B, 4H, I, kc, k_in)
``bwd_data`` (dh)   (B,kc) @ W_hh[g_cols][:, kept]                   GatherKN(1, B, 4H, H, kc, k_h)
``wgrad`` (ih)      (T,B,kc).T @ (T,B,I)[kept]                       WgradT(T, B, kc, I, k_in)
``wgrad`` (hh)      (T,B,kc).T @ (T,B,H)[kept]                       WgradT(T, B, kc, H, k_h)
==================  ===============================================  =====================

``fwd_input`` of a sequence (``T > 1``) in fp16/bf16 is :class:`~.gemm_gather.GatherRowsT`:
the transposed product from the transposed operands, whole kept rows copied by ``cp.async``
(the backend falls back to a bundle's ``GatherK(T, B, 4H, I, k_in)``, and float32 and one-step
specs use that). With coarse gate sparsity the ``bwd_data`` specs index ``dnet``'s kept slices as blocks
(``P`` = the slice width). With fine gate sparsity (``My x Mx`` blocks, ``K`` dropped per
slice) the column GEMMs are replaced, per step and per weight (``K_w`` = I or H, ``k`` =
k_in or k_h), by ``bwd_data_blockrows`` = ``BlockRowsData(S=4H/Mx, Mx, My=1, nb=B_pad,
kb=kept rows, K_w, k)`` and ``wgrad_blockrows`` = ``BlockRowsWgrad(S, Mx, 1, kept rows, B_pad,
K_w, k)``, at row granularity (see :func:`fine_rows`), for the full batch ``B`` only.

The per-step GEMMs (``T = 1``: the recurrent ones, and the input ones of a one-step spec)
get :func:`~.gemm_gather.per_step_tile` (small M tile, split-K
to >= 132 CTAs); the whole-sequence ``bwd_data`` (dx) :func:`~.gemm_gather.sequence_tile`
(small M tile, split-K to >= 528 CTAs and <= 32 K stages per CTA); the other sequence GEMMs
the default tile. A GEMM with nothing sparse is dense and
stays on cuBLAS (no spec).
Pure Python: no TVM, no torch needed for :class:`LSTMSpec` itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UnsupportedGemm
from .gemm_gather import (BlockRowsData, BlockRowsWgrad, GatherK, GatherKN, GatherRowsT, IndexedGemm, WgradT,
                          per_step_tile, rows_tile, sequence_tile)

_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32"}


def _kept(n: int, p: float) -> int:
    """Same rule as :func:`rnn_sparsify.config.kept_count` (kept here to stay import-free)."""
    if p <= 0:
        return n
    return min(n, max(1, int(math.floor((1.0 - p) * n + 0.5))))


def kept_gate_columns(hidden_size: int, gate: dict[str, Any] | None) -> int | None:
    """Kept ``dnet`` columns per step for a gate-sparsity config dict; ``None`` when dense or
    fine-grained (no column structure)."""
    if not gate:
        return None
    cols = 4 * hidden_size
    mode = gate.get("mode", "coarse")
    if mode == "coarse":
        P, R, S = gate.get("P", 4), gate.get("R", 8), gate.get("S", 4)
        slices = cols // P
        dropped = (slices // R) * S + (S * (slices % R)) // R
        return (slices - dropped) * P
    if mode == "meprop":
        return max(1, min(cols, int(math.floor(gate.get("keep", 0.5) * cols + 0.5))))
    return None


def gate_block(gate: dict[str, Any] | None) -> int:
    """Width of the kept column blocks of ``dnet`` the backward-data kernel indexes: the slice
    width ``P`` for coarse sparsity (``g_cols`` comes in aligned runs of ``P``), else 1."""
    if gate and gate.get("mode", "coarse") == "coarse":
        return int(gate.get("P", 4))
    return 1


def fine_rows(hidden_size: int, batch: int, gate: dict[str, Any] | None) -> dict[str, int] | None:
    """Row-granular shape of a fine-grained sparse ``dnet`` at full batch, as the backend
    indexes it: ``S`` column slices of ``Mx``, ``nb`` = the batch padded to ``My`` rows, ``kb``
    kept rows per slice (``My = 1``: the backend methods get row numbers, not the block
    height, and rows of aligned blocks of any height are exact at row granularity).
    ``None`` when not fine mode or the config cannot apply (``K`` >= blocks per slice)."""
    if not gate or gate.get("mode") != "fine":
        return None
    My, Mx, K = gate.get("My", 8), gate.get("Mx", 4), gate.get("K", 4)
    nb = -(-batch // My)
    if (4 * hidden_size) % Mx or K >= nb:
        return None
    return {"S": 4 * hidden_size // Mx, "Mx": Mx, "My": 1, "nb": nb * My, "kb": (nb - K) * My}


@dataclass(frozen=True)
class LSTMSpec:
    """An LSTM's GEMM shapes: sizes, batch, sequence length, dtype and sparsity configs
    (``structured_dropout``/``gate_sparsity`` as the configs' ``to_dict()`` or ``None``)."""

    input_size: int
    hidden_size: int
    batch: int
    seq_len: int
    num_layers: int = 1
    bidirectional: bool = False
    dtype: str = "bfloat16"
    structured_dropout: dict[str, Any] | None = None
    gate_sparsity: dict[str, Any] | None = None
    name: str = "lstm"

    def __post_init__(self) -> None:
        for f in ("input_size", "hidden_size", "batch", "seq_len", "num_layers"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UnsupportedGemm(f"LSTMSpec.{f} must be a positive int, got {v!r}")
        if self.dtype not in _DTYPES:
            raise UnsupportedGemm(f"LSTMSpec.dtype must be one of {sorted(set(_DTYPES.values()))}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", _DTYPES[self.dtype])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_module(cls, module, batch: int, seq_len: int, dtype: str | None = None, name: str = "lstm") -> "LSTMSpec":
        """Spec of an ``nn.LSTM``/``SparseLSTM`` (its sparsity configs, if any)."""
        sd = getattr(module, "structured_dropout", None)
        gs = getattr(module, "gate_sparsity", None)
        if dtype is None:
            dtype = str(module.weight_ih_l0.dtype).replace("torch.", "")
        return cls(
            input_size=module.input_size,
            hidden_size=module.hidden_size,
            batch=batch,
            seq_len=seq_len,
            num_layers=module.num_layers,
            bidirectional=module.bidirectional,
            dtype=dtype,
            structured_dropout=sd.to_dict() if sd is not None else None,
            gate_sparsity=gs.to_dict() if gs is not None else None,
            name=name,
        )

    def gemms(self) -> list[tuple[str, IndexedGemm]]:
        """``(method, spec)`` for every indexed GEMM this LSTM runs, without duplicates."""
        H, B, T, dt = self.hidden_size, self.batch, self.seq_len, self.dtype
        sd = self.structured_dropout or {}
        p_in, p_h = sd.get("p_input", 0.0), sd.get("p_recurrent", 0.0)
        kc = kept_gate_columns(H, self.gate_sparsity)
        P = gate_block(self.gate_sparsity)
        fine = fine_rows(H, B, self.gate_sparsity)
        out: list[tuple[str, IndexedGemm]] = []

        def step_tile(M, N, K):  # the input GEMMs are per-step too in a one-step spec (cells)
            return {"tile": per_step_tile(M, N, K)} if T == 1 else {}

        dirs = 2 if self.bidirectional else 1
        for layer in range(self.num_layers):
            I = self.input_size if layer == 0 else H * dirs
            k_in = _kept(I, p_in) if p_in > 0 else None
            k_h = _kept(H, p_h) if p_h > 0 else None
            if k_in is not None and T > 1 and dt != "float32":  # whole-row gathers, cp.async
                out.append(("fwd_input", GatherRowsT(T=T, M=B, N=4 * H, K=I, k=k_in, dtype=dt, tile=rows_tile(B))))
            elif k_in is not None:
                out.append(("fwd_input", GatherK(T=T, M=B, N=4 * H, K=I, k=k_in, dtype=dt,
                                                 **step_tile(B, 4 * H, k_in))))
            if k_h is not None:
                out.append(("fwd_recurrent", GatherK(T=1, M=B, N=4 * H, K=H, k=k_h, dtype=dt,
                                                     tile=per_step_tile(B, 4 * H, k_h))))
            if fine is not None:
                for K, k in ((I, k_in), (H, k_h)):
                    out.append(("bwd_data_blockrows", BlockRowsData(K=K, k=k, dtype=dt, **fine)))
                    out.append(("wgrad_blockrows", BlockRowsWgrad(
                        S=fine["S"], Mx=fine["Mx"], My=1, kb=fine["kb"], n_rows=fine["nb"], K=K, k=k, dtype=dt)))
                continue
            if kc is not None or k_in is not None:
                dx_tile = per_step_tile if T == 1 else lambda *mnk: sequence_tile(T, *mnk)
                out.append(("bwd_data", GatherKN(T=T, M=B, Nw=4 * H, Kw=I, kc=kc, kn=k_in, dtype=dt, P=P,
                                                 tile=dx_tile(B, k_in or I, kc or 4 * H))))
                out.append(("wgrad", WgradT(T=T, B=B, kc=kc or 4 * H, K=I, k=k_in, dtype=dt)))
            if kc is not None or k_h is not None:
                out.append(("bwd_data", GatherKN(T=1, M=B, Nw=4 * H, Kw=H, kc=kc, kn=k_h, dtype=dt, P=P,
                                                 tile=per_step_tile(B, k_h or H, kc or 4 * H))))
                out.append(("wgrad", WgradT(T=T, B=B, kc=kc or 4 * H, K=H, k=k_h, dtype=dt)))
        seen, unique = set(), []
        for method, spec in out:
            if spec.problem not in seen:
                seen.add(spec.problem)
                unique.append((method, spec))
        return unique


def specs_from_model(model, batch: int, seq_len: int, dtype: str | None = None) -> list[LSTMSpec]:
    """One :class:`LSTMSpec` per ``nn.LSTM`` (``SparseLSTM`` included) inside ``model``."""
    import torch

    out = []
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.LSTM):
            out.append(LSTMSpec.from_module(m, batch, seq_len, dtype, name=fqn or "lstm"))
    return out
