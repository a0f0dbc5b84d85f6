"""Indexed GEMM generators: TensorIR functions whose operands are read through index arrays.

Every generator describes ``C[t] = A'[t] @ B'[t]`` for ``t < T`` (``T = 1``: one GEMM; ``T > 1``:
one launch for a whole sequence, with per-step index arrays), where ``A'``/``B'`` are read from
the caller's tensors through int32 arrays of kept *blocks* of width ``P``: block ``b`` stands for
the source positions ``idx[t, b] * P + (0 .. P-1)`` (``P = 1``: dropout units; ``P = 4`` or the
gate-gradient slice width: kept ``dnet`` slices). The three families are the GEMMs of the sparse
LSTM (see :mod:`rnn_sparsify.kernels.reference` for the exact semantics):

* :class:`GatherK`   ``C[t] = A[t][:, kept] @ W[:, kept].T``       forward (input and recurrent)
* :class:`GatherKN`  ``C[t] = G[t] @ W[rows[t]][:, cols[t]]``       backward-data (sparse dnet
  slices along K, output sparsity along N)
* :class:`WgradT`    ``C[t] = G[t].T @ X[t][:, kept[t]]``          weight gradient of a whole
  sequence (gather along N; the caller scatters the ``T`` products into the weight gradient)

The function has two stages per operand, as TVM 0.27 needs for tensorization (an indirect
access inside the tensorized block does not match the mma intrinsics): a *gather* block that
writes a dense, zero-padded tile (``A_g``, ``B_g``), and the dense GEMM block ``C``. On the GPU
the gather blocks become the global->shared copies of the tiled GEMM (see
:mod:`rnn_sparsify.codegen.schedule`); on the CPU the same function is built unscheduled with
LLVM, which is how the algorithm is tested without a GPU (the CUDA schedules themselves are run
on the CPU by :mod:`rnn_sparsify.codegen.emulate`).

Ragged sizes: the GEMM runs over sizes padded up to the tile (``Mp, Np, Kp``); the gather blocks
read zeros outside the logical sizes, and ``C`` is the padded ``(T, Mp, Np)`` fp32 product (the
kernel wrapper returns the ``[:, :M, :N]`` view). Empty index arrays (``k = 0``) are valid: the
index buffer then has one (never read) element and ``C`` is zero.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import UnsupportedGemm

DTYPES = ("float16", "bfloat16", "float32")


def _ceil_to(x: int, m: int) -> int:
    return max(1, math.ceil(x / m)) * m


@dataclass(frozen=True)
class Tile:
    """CTA tile ``bm x bn`` with a ``bk`` slice of the reduction per shared-memory stage, split
    over ``warps_m x warps_n`` warps (each warp owns ``bm/warps_m x bn/warps_n``, in 16x16
    mma fragments).

    ``split_k`` (split-K, :class:`GatherK` and :class:`GatherKN` only): the padded reduction is
    cut into ``split_k`` equal slices of whole ``bk`` stages, one CTA per (tile, step, slice);
    each writes its fp32 partial product to its own row of the output, ``C`` is
    ``(T * split_k, Mp, Np)`` with row ``t * split_k + s`` = slice ``s`` of step ``t``, and the
    caller sums the ``split_k`` partials of a step (no atomics: deterministic)."""

    bm: int = 64
    bn: int = 128
    bk: int = 32
    warps_m: int = 2
    warps_n: int = 2
    split_k: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.split_k, int) or isinstance(self.split_k, bool) or self.split_k < 1:
            raise UnsupportedGemm(f"Tile.split_k must be a positive int, got {self.split_k!r}")
        for name in ("bm", "bn", "bk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % 16:
                raise UnsupportedGemm(f"Tile.{name} must be a positive multiple of 16, got {v!r}")
        if self.bm % (16 * self.warps_m) or self.bn % (16 * self.warps_n):
            raise UnsupportedGemm(
                f"Tile {self}: bm must be a multiple of 16*warps_m and bn of 16*warps_n"
            )

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n


@dataclass(frozen=True)
class IndexedGemm:
    """Common part of the generators: batch, dtype, tile, and the buffer list.

    Subclasses define the logical sizes ``(M, N, K)`` of the product, the kernel parameters
    (``params``: name, shape, dtype, in PrimFunc order) and the TE compute (``_compute``).
    """

    kind: ClassVar[str] = ""
    splittable: ClassVar[bool] = False  # takes Tile.split_k > 1
    a_trans: ClassVar[bool] = False  # A tile stored [k, m] in shared memory
    b_trans: ClassVar[bool] = False  # B tile stored [n, k]

    def _check_common(self) -> None:
        if self.dtype not in DTYPES:
            raise UnsupportedGemm(f"{type(self).__name__}.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name, f in self.__dataclass_fields__.items():
            v = getattr(self, name)
            if f.type in ("int",) and (not isinstance(v, int) or v < 0):
                raise UnsupportedGemm(f"{type(self).__name__}.{name} must be a non-negative int, got {v!r}")
        if self.T < 1:
            raise UnsupportedGemm(f"{type(self).__name__}.T must be >= 1, got {self.T}")
        if self.tile.split_k > 1 and not self.splittable:
            raise UnsupportedGemm(f"{type(self).__name__}: no split-K (Tile.split_k={self.tile.split_k})")

    # -- sizes ---------------------------------------------------------------------------
    @property
    def mnk(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def padded(self) -> tuple[int, int, int]:
        M, N, K = self.mnk
        t = self.tile
        return _ceil_to(M, t.bm), _ceil_to(N, t.bn), _ceil_to(K, t.bk * t.split_k)

    @property
    def k_slice(self) -> int:
        """Padded reduction length of one CTA: ``Kp / split_k`` (a multiple of ``bk``)."""
        return self.padded[2] // self.tile.split_k

    @property
    def out_shape(self) -> tuple[int, int, int]:
        Mp, Np, _ = self.padded
        return (self.T * self.tile.split_k, Mp, Np)

    @property
    def ctas(self) -> int:
        """CTAs of one launch of the CUDA schedules: one per ``bm x bn`` output tile and row of
        ``out_shape`` (time step)."""
        Mp, Np, _ = self.padded
        return (Mp // self.tile.bm) * (Np // self.tile.bn) * self.out_shape[0]

    @property
    def k_stages(self) -> int:
        """Serial ``bk``-wide K stages (shared-memory copy + mma) each CTA runs."""
        return self.k_slice // self.tile.bk

    @property
    def flops(self) -> int:
        M, N, K = self.mnk
        return 2 * self.T * M * N * K

    # -- identity ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Kernel function name (a C identifier, unique per spec)."""
        from .manifest import content_hash

        return f"{self.kind}_{content_hash(self.to_dict())[:12]}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["tile"].get("split_k") == 1:  # the default: names of unsplit kernels unchanged
            del d["tile"]["split_k"]
        return {"kind": self.kind, **d}

    @property
    def problem(self) -> tuple:
        """What the kernel computes, without how (the tile): the run-time lookup key."""
        return problem_key(self.to_dict())

    # -- the TensorIR function -----------------------------------------------------------
    def params(self) -> list[tuple[str, tuple[int, ...], str]]:
        raise NotImplementedError

    def primfunc(self):
        """The TensorIR PrimFunc (blocks ``A_g``, ``B_g``, ``C``), unscheduled."""
        from .toolchain import import_tvm

        import_tvm()
        from tvm import te

        tensors = {n: te.placeholder(shape, dt, name=n) for n, shape, dt in self.params()[:-1]}
        C = self._compute(te, tensors)
        func = te.create_prim_func([*tensors.values(), C])
        return func.with_attr({"global_symbol": self.name, "tirx.noalias": True})

    def _compute(self, te, t):  # pragma: no cover - abstract
        raise NotImplementedError

    # helpers for subclasses
    def _zero(self):
        from tvm import tirx

        return tirx.const(0, self.dtype)

    def _guard(self, conds, value):
        """``value`` where every condition holds (bounds of ragged sizes), else 0."""
        from tvm import tirx

        conds = [c for c in conds if c is not None]
        if not conds:
            return value
        return tirx.if_then_else(tirx.all(*conds) if len(conds) > 1 else conds[0], value, self._zero())

    def _slice(self, tt, r):
        """``(step, K position)`` of row ``tt`` of ``out_shape`` and position ``r`` of its K
        slice: ``(tt // split_k, (tt % split_k) * k_slice + r)``."""
        S = self.tile.split_k
        if S == 1:
            return tt, r
        return tt // S, (tt % S) * self.k_slice + r

    @staticmethod
    def _pos(idx, t, j, P: int):
        """Source position of logical position ``j`` at step ``t``: ``idx[t, j // P] * P + j % P``."""
        if P == 1:
            return idx[t, j]
        return idx[t, j // P] * P + j % P


# Per-step GEMMs (T = 1: the recurrent forward and the dh backward-data of one time step) run
# once per step and layer, on a batch of 4-64 rows; with the sequence tile (64 x 128, no split)
# they launch 3-47 CTAs (docs/codegen.md, "Known limits"). Their tile instead: the smallest
# M tile that holds the batch, 64-column N tiles, and split-K up to PER_STEP_TARGET_CTAS
# (>= one CTA per SM on an H100: 132; A100: 108), keeping >= PER_STEP_MIN_STAGES K stages
# per CTA.
PER_STEP_TARGET_CTAS = 132
PER_STEP_MIN_STAGES = 2
# The whole-sequence backward-data (dx: M = batch, N = kept inputs, K = 4H, T steps in one
# launch) has plenty of CTAs without a split (T x N tiles: 210 at 650/B20) but a long K (82-188
# stages of 32): split-K up to SEQ_TARGET_CTAS (4 four-warp CTAs per SM of an H100) and at
# most SEQ_MAX_STAGES stages per CTA. Not fewer stages: every slice adds a (T, Mp, Np) fp32
# partial that the wrapper writes and sums (docs/codegen.md, "Known limits").
SEQ_TARGET_CTAS = 4 * 132
SEQ_MAX_STAGES = 32


def split_tile(M: int, N: int, K: int, T: int = 1, target_ctas: int = PER_STEP_TARGET_CTAS,
               min_stages: int = PER_STEP_MIN_STAGES, max_stages: int | None = None) -> Tile:
    """Tile of a GEMM ``(M, N, K)`` (``M`` = batch) run for ``T`` steps in one launch: ``bm`` =
    16, 32 or 64 (the smallest >= M, 64 above), ``bn`` = 64, ``bk`` = 32, and ``split_k``
    slices of ``ceil(stages / wanted)`` K stages each (at least ``min_stages``, at most
    ``max_stages`` when given: the cap wins), ``wanted`` = ``ceil(target_ctas / (T * tiles))``;
    every slice holds at least one stage of real K (none is all padding), so the count can land
    a little under ``wanted``."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    bn, bk = 64, 32
    tiles = T * math.ceil(max(M, 1) / bm) * math.ceil(max(N, 1) / bn)
    stages = math.ceil(max(K, 1) / bk)
    per = max(min_stages, math.ceil(stages / math.ceil(target_ctas / tiles)))
    if max_stages is not None:
        per = min(per, max_stages)
    split = max(1, math.ceil(stages / per))
    return Tile(bm=bm, bn=bn, bk=bk, warps_m=1 if bm == 16 else 2, warps_n=2, split_k=split)


def per_step_tile(M: int, N: int, K: int, target_ctas: int = PER_STEP_TARGET_CTAS,
                  min_stages: int = PER_STEP_MIN_STAGES) -> Tile:
    """Tile of a one-step GEMM (:func:`split_tile` with ``T = 1``, no stage cap)."""
    return split_tile(M, N, K, 1, target_ctas, min_stages)


def sequence_tile(T: int, M: int, N: int, K: int) -> Tile:
    """Tile of the whole-sequence backward-data (dx): :func:`split_tile` over ``T`` steps to
    ``SEQ_TARGET_CTAS`` CTAs and at most ``SEQ_MAX_STAGES`` K stages per CTA."""
    return split_tile(M, N, K, T, SEQ_TARGET_CTAS, PER_STEP_MIN_STAGES, SEQ_MAX_STAGES)


def _check_gather(owner: str, what: str, kept: int, src: int, P: int) -> None:
    if not isinstance(P, int) or P < 1:
        raise UnsupportedGemm(f"{owner}.{what}: block width P must be a positive int, got {P!r}")
    if kept % P or src % P:
        raise UnsupportedGemm(f"{owner}.{what}: P={P} must divide kept={kept} and size={src}")
    if kept > src:
        raise UnsupportedGemm(f"{owner}.{what}: kept={kept} exceeds size={src}")


@dataclass(frozen=True)
class GatherK(IndexedGemm):
    """``C[t] = A[t][:, kept_t] @ W[:, kept_t].T`` -- gather along K of both operands.

    ``A``: (T, M, K); ``W``: (N, K) (a PyTorch weight, shared by all steps); ``idx``: (T, k/P)
    int32 kept blocks of K. Forward input projection of a sequence (``T`` steps) and the
    recurrent GEMM of one step (``T = 1``).
    """

    T: int
    M: int
    N: int
    K: int
    k: int
    dtype: str = "bfloat16"
    P: int = 1
    tile: Tile = field(default_factory=Tile)

    kind: ClassVar[str] = "gather_k"
    splittable: ClassVar[bool] = True
    b_trans: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_common()
        _check_gather("GatherK", "k", self.k, self.K, self.P)

    @property
    def mnk(self):
        return self.M, self.N, self.k

    def params(self):
        return [
            ("A", (self.T, self.M, self.K), self.dtype),
            ("W", (self.N, self.K), self.dtype),
            ("idx", (self.T, max(1, self.k // self.P)), "int32"),
            ("C", self.out_shape, "float32"),
        ]

    def _compute(self, te, b):
        A, W, idx = b["A"], b["W"], b["idx"]
        M, N, k = self.mnk
        Mp, Np, Kp = self.padded
        P = self.P
        TS, Ks = self.out_shape[0], self.k_slice

        def a(t, m, j):
            return self._guard([m < M if Mp != M else None, j < k if Kp != k else None], A[t, m, self._pos(idx, t, j, P)])

        def w(t, n, j):
            return self._guard([n < N if Np != N else None, j < k if Kp != k else None], W[n, self._pos(idx, t, j, P)])

        Ag = te.compute((TS, Mp, Ks), lambda tt, m, r: a(self._slice(tt, r)[0], m, self._slice(tt, r)[1]), name="A_g")
        Bg = te.compute((TS, Np, Ks), lambda tt, n, r: w(self._slice(tt, r)[0], n, self._slice(tt, r)[1]), name="B_g")
        r = te.reduce_axis((0, Ks), name="r")
        return te.compute(
            (TS, Mp, Np),
            lambda t, m, n: te.sum(Ag[t, m, r].astype("float32") * Bg[t, n, r].astype("float32"), axis=r),
            name="C",
        )


@dataclass(frozen=True)
class GatherKN(IndexedGemm):
    """``C[t] = G[t] @ W[rows_t][:, cols_t]`` -- gather along K (rows of W) and N (columns of W).

    ``G``: (T, M, kc), the kept columns of ``dnet``; ``W``: (Nw, Kw); ``rows``: (T, kc/P) kept
    blocks of W's rows (omitted when ``kc is None``: all ``Nw`` rows, ``G`` is dense); ``cols``:
    (T, kn/Q) kept blocks of W's columns (omitted when ``kn is None``: all ``Kw`` columns).
    Backward-data with a column-sparse ``dnet`` and output sparsity.
    """

    T: int
    M: int
    Nw: int
    Kw: int
    kc: int | None
    kn: int | None
    dtype: str = "bfloat16"
    P: int = 1
    Q: int = 1
    tile: Tile = field(default_factory=Tile)

    kind: ClassVar[str] = "gather_kn"
    splittable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_common()
        if self.kc is None and self.kn is None:
            raise UnsupportedGemm("GatherKN: kc and kn are both None (a dense GEMM: use cuBLAS)")
        if self.kc is not None:
            _check_gather("GatherKN", "kc", self.kc, self.Nw, self.P)
        if self.kn is not None:
            _check_gather("GatherKN", "kn", self.kn, self.Kw, self.Q)

    @property
    def mnk(self):
        return self.M, (self.Kw if self.kn is None else self.kn), (self.Nw if self.kc is None else self.kc)

    def params(self):
        M, N, K = self.mnk
        out = [("G", (self.T, M, K), self.dtype), ("W", (self.Nw, self.Kw), self.dtype)]
        if self.kc is not None:
            out.append(("rows", (self.T, max(1, self.kc // self.P)), "int32"))
        if self.kn is not None:
            out.append(("cols", (self.T, max(1, self.kn // self.Q)), "int32"))
        out.append(("C", self.out_shape, "float32"))
        return out

    def _compute(self, te, b):
        G, W = b["G"], b["W"]
        M, N, K = self.mnk
        Mp, Np, Kp = self.padded

        def row(t, j):
            return j if self.kc is None else self._pos(b["rows"], t, j, self.P)

        def col(t, n):
            return n if self.kn is None else self._pos(b["cols"], t, n, self.Q)

        TS, Ks = self.out_shape[0], self.k_slice

        def g(t, m, j):
            return self._guard([m < M if Mp != M else None, j < K if Kp != K else None], G[t, m, j])

        def w(t, j, n):
            return self._guard([j < K if Kp != K else None, n < N if Np != N else None], W[row(t, j), col(t, n)])

        Ag = te.compute((TS, Mp, Ks), lambda tt, m, r: g(self._slice(tt, r)[0], m, self._slice(tt, r)[1]), name="A_g")
        Bg = te.compute((TS, Ks, Np), lambda tt, r, n: w(*self._slice(tt, r), n), name="B_g")
        r = te.reduce_axis((0, Ks), name="r")
        return te.compute(
            (TS, Mp, Np),
            lambda t, m, n: te.sum(Ag[t, m, r].astype("float32") * Bg[t, r, n].astype("float32"), axis=r),
            name="C",
        )


@dataclass(frozen=True)
class WgradT(IndexedGemm):
    """``C[t] = G[t].T @ X[t][:, kept_t]`` for every step in one launch -- gather along N.

    ``G``: (T, B, kc) kept ``dnet`` columns; ``X``: (T, B, K) the layer input (or ``h``);
    ``idx``: (T, k/P) kept blocks of X's columns (omitted when ``k is None``). The reduction
    runs over the batch ``B``. ``C[t]`` is the ``(kc, k)`` block of the weight gradient that
    step ``t`` touches; the caller adds it at ``[g_cols[t]][:, idx[t]]``.
    """

    T: int
    B: int
    kc: int
    K: int
    k: int | None
    dtype: str = "bfloat16"
    P: int = 1
    tile: Tile = field(default_factory=lambda: Tile(bm=64, bn=128, bk=32, warps_m=2, warps_n=2))

    kind: ClassVar[str] = "wgrad_t"
    a_trans: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_common()
        if self.k is not None:
            _check_gather("WgradT", "k", self.k, self.K, self.P)

    @property
    def mnk(self):
        return self.kc, (self.K if self.k is None else self.k), self.B

    def params(self):
        out = [("G", (self.T, self.B, self.kc), self.dtype), ("X", (self.T, self.B, self.K), self.dtype)]
        if self.k is not None:
            out.append(("idx", (self.T, max(1, self.k // self.P)), "int32"))
        out.append(("C", self.out_shape, "float32"))
        return out

    def _compute(self, te, b):
        G, X = b["G"], b["X"]
        M, N, K = self.mnk
        Mp, Np, Kp = self.padded

        def col(t, n):
            return n if self.k is None else self._pos(b["idx"], t, n, self.P)

        Ag = te.compute(
            (self.T, Kp, Mp),
            lambda t, j, m: self._guard(
                [j < K if Kp != K else None, m < M if Mp != M else None], G[t, j, m]
            ),
            name="A_g",
        )
        Bg = te.compute(
            (self.T, Kp, Np),
            lambda t, j, n: self._guard(
                [j < K if Kp != K else None, n < N if Np != N else None], X[t, j, col(t, n)]
            ),
            name="B_g",
        )
        r = te.reduce_axis((0, Kp), name="r")
        return te.compute(
            (self.T, Mp, Np),
            lambda t, m, n: te.sum(Ag[t, r, m].astype("float32") * Bg[t, r, n].astype("float32"), axis=r),
            name="C",
        )


def rows_tile(M: int) -> Tile:
    """Default tile of :class:`GatherRowsT` for a batch of ``M`` rows (the GEMM's N): 128 rows
    of ``4H`` per CTA, ``bn`` = 16, 32 or 64 batch columns (the smallest >= M, 64 above), four
    warps of 32x16 / 32x32 / 64x32."""
    bn = 16 if M <= 16 else 32 if M <= 32 else 64
    return Tile(bm=128, bn=bn, bk=32, warps_m=4 if bn < 64 else 2, warps_n=1 if bn < 64 else 2)


@dataclass(frozen=True)
class GatherRowsT(IndexedGemm):
    """``C[t] = (A[t][:, kept_t] @ W[:, kept_t].T).T`` -- :class:`GatherK`'s product, transposed,
    from operands whose kept units are whole *rows* (``4H`` as M, the batch as N).

    The caller passes the weight transposed and the input transposed per step, so kept input
    unit ``i`` is one contiguous row of each: ``Wt``: (K + 1, Np) = ``W.T`` zero-padded to the
    tile's ``Np`` columns, plus a zero row ``K``; ``Xt``: (T, K + 1, Mp) = ``A[t].T`` zero-padded
    to ``Mp`` batch columns, plus a zero row ``K``; ``idx``: (T, Kp) int32, the kept units of each
    step followed by ``K`` (the zero rows) up to the padded reduction ``Kp``. The kernel has no
    bounds guards: every gather is a whole row, one index per row, in 16-byte vectors (the
    CUDA schedule copies them global->shared with ``cp.async`` in a multi-stage pipeline,
    :func:`~.schedule.tensorcore`). ``C``: (T * split_k, Np, Mp) fp32 (``C[t][n, m]`` =
    output ``(m, n)`` of step ``t``). Only blocks of ``P = 1`` (dropout units).
    """

    T: int
    M: int
    N: int
    K: int
    k: int
    dtype: str = "bfloat16"
    tile: Tile = field(default_factory=lambda: rows_tile(32))

    kind: ClassVar[str] = "gather_rows_t"
    splittable: ClassVar[bool] = True
    a_trans: ClassVar[bool] = True
    pipeline_stages: ClassVar[int] = 3  # shared-memory stages of the CUDA schedule's K loop

    def __post_init__(self) -> None:
        self._check_common()
        _check_gather("GatherRowsT", "k", self.k, self.K, 1)
        if self.dtype == "float32":
            raise UnsupportedGemm("GatherRowsT: float16/bfloat16 only (tensor cores; float32 takes GatherK)")

    @property
    def mnk(self):
        return self.N, self.M, self.k

    def params(self):
        Np, Mp, Kp = self.padded
        return [
            ("Wt", (self.K + 1, Np), self.dtype),
            ("Xt", (self.T, self.K + 1, Mp), self.dtype),
            ("idx", (self.T, Kp), "int32"),
            ("C", self.out_shape, "float32"),
        ]

    def _compute(self, te, b):
        Wt, Xt, idx = b["Wt"], b["Xt"], b["idx"]
        Np, Mp, _ = self.padded
        TS, Ks = self.out_shape[0], self.k_slice

        def row(tt, r):
            t, j = self._slice(tt, r)
            return t, idx[t, j]

        Ag = te.compute((TS, Ks, Np), lambda tt, r, n: Wt[row(tt, r)[1], n], name="A_g")
        Bg = te.compute((TS, Ks, Mp), lambda tt, r, m: Xt[row(tt, r)[0], row(tt, r)[1], m], name="B_g")
        r = te.reduce_axis((0, Ks), name="r")
        return te.compute(
            (TS, Np, Mp),
            lambda t, n, m: te.sum(Ag[t, r, n].astype("float32") * Bg[t, r, m].astype("float32"), axis=r),
            name="C",
        )


def _check_blockrows(owner: str, S: int, Mx: int, My: int, kb: int, nb: int) -> None:
    for name, v in (("S", S), ("Mx", Mx), ("My", My)):
        if v < 1:
            raise UnsupportedGemm(f"{owner}.{name} must be >= 1, got {v}")
    if kb > nb:
        raise UnsupportedGemm(f"{owner}: kb={kb} kept row blocks exceed the nb={nb} row blocks")


@dataclass(frozen=True)
class BlockRowsData(IndexedGemm):
    """``C = D @ W[:, cols]`` with ``D`` a fine-grained sparse ``dnet`` -- backward-data of
    fine gate-gradient sparsity (``ReferenceBackend.bwd_data_blockrows``), no scatter.

    ``D`` (``nb*My`` rows x ``S*Mx`` columns) is never stored: column slice ``s`` keeps ``kb``
    of its ``nb`` row blocks of ``My`` rows, packed in ``V``: (S, kb*My, Mx). ``pos``: (S, nb)
    int32, the inverse map: ``pos[s, b]`` = the position of row block ``b`` among slice ``s``'s
    kept blocks, ``-1`` when it is dropped. ``W``: (S*Mx, K); ``cols``: (1, k) kept columns of
    W (omitted when ``k is None``). The gather of ``A`` reads each element of ``D`` from ``V``
    or as zero (every output row is written once: no atomics); the reduction runs over all
    ``S*Mx`` columns (a dropped My x Mx block is smaller than an mma fragment, so the
    multiplications are not skipped, the loads of dropped blocks are).
    """

    S: int
    Mx: int
    My: int
    nb: int
    kb: int
    K: int
    k: int | None
    dtype: str = "bfloat16"
    tile: Tile = field(default_factory=Tile)

    kind: ClassVar[str] = "blockrows_data"
    T: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self._check_common()
        _check_blockrows("BlockRowsData", self.S, self.Mx, self.My, self.kb, self.nb)
        if self.k is not None:
            _check_gather("BlockRowsData", "k", self.k, self.K, 1)

    @property
    def mnk(self):
        return self.nb * self.My, (self.K if self.k is None else self.k), self.S * self.Mx

    def params(self):
        out = [
            ("V", (self.S, max(1, self.kb * self.My), self.Mx), self.dtype),
            ("W", (self.S * self.Mx, self.K), self.dtype),
            ("pos", (self.S, self.nb), "int32"),
        ]
        if self.k is not None:
            out.append(("cols", (1, max(1, self.k)), "int32"))
        out.append(("C", self.out_shape, "float32"))
        return out

    def _compute(self, te, b):
        from tvm import tirx

        V, W, pos = b["V"], b["W"], b["pos"]
        M, N, K = self.mnk
        Mp, Np, Kp = self.padded
        Mx, My = self.Mx, self.My

        def d(m, c):  # element (m, c) of the sparse dnet: from V, or 0 in a dropped block
            s, p = c // Mx, pos[c // Mx, m // My]
            return tirx.if_then_else(p >= 0, V[s, p * My + m % My, c % Mx], self._zero())

        def col(n):
            return n if self.k is None else b["cols"][0, n]

        Ag = te.compute(
            (1, Mp, Kp),
            lambda t, m, c: self._guard([m < M if Mp != M else None, c < K if Kp != K else None], d(m, c)),
            name="A_g",
        )
        Bg = te.compute(
            (1, Kp, Np),
            lambda t, c, n: self._guard(
                [c < K if Kp != K else None, n < N if Np != N else None], W[c, col(n)]
            ),
            name="B_g",
        )
        r = te.reduce_axis((0, Kp), name="r")
        return te.compute(
            (1, Mp, Np),
            lambda t, m, n: te.sum(Ag[t, m, r].astype("float32") * Bg[t, r, n].astype("float32"), axis=r),
            name="C",
        )


@dataclass(frozen=True)
class BlockRowsWgrad(IndexedGemm):
    """``C[s] = V[s].T @ X[rows_s][:, cols]`` for every column slice ``s`` in one launch --
    weight gradient of fine gate-gradient sparsity (``ReferenceBackend.wgrad_blockrows``):
    a gather of the kept row blocks along the reduction.

    ``V``: (S, kb*My, Mx) kept values per slice; ``rows``: (S, kb) int32 kept row blocks of
    ``My`` rows of ``X``: (n_rows, K); ``cols``: (1, k) kept columns of X (omitted when ``k is
    None``). The slices are the batch (``T = S``) and the reduction runs over the ``kb*My``
    kept rows only: dropped blocks are skipped. ``C[s]`` is the (Mx, k) block of the weight
    gradient at rows ``[s*Mx, (s+1)*Mx)``; the caller adds it there. ``Mx`` (4 by default) is
    padded to the tile's ``bm``: hence the default tile of 16 rows.
    """

    S: int
    Mx: int
    My: int
    kb: int
    n_rows: int
    K: int
    k: int | None
    dtype: str = "bfloat16"
    tile: Tile = field(default_factory=lambda: Tile(bm=16, bn=128, bk=32, warps_m=1, warps_n=4))

    kind: ClassVar[str] = "blockrows_wgrad"
    a_trans: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_common()
        if self.n_rows % max(1, self.My):
            raise UnsupportedGemm(f"BlockRowsWgrad: n_rows={self.n_rows} is not a multiple of My={self.My}")
        _check_blockrows("BlockRowsWgrad", self.S, self.Mx, self.My, self.kb, self.n_rows // self.My)
        if self.k is not None:
            _check_gather("BlockRowsWgrad", "k", self.k, self.K, 1)

    @property
    def T(self) -> int:  # one GEMM per column slice
        return self.S

    @property
    def mnk(self):
        return self.Mx, (self.K if self.k is None else self.k), self.kb * self.My

    def params(self):
        out = [
            ("V", (self.S, max(1, self.kb * self.My), self.Mx), self.dtype),
            ("X", (self.n_rows, self.K), self.dtype),
            ("rows", (self.S, max(1, self.kb)), "int32"),
        ]
        if self.k is not None:
            out.append(("cols", (1, max(1, self.k)), "int32"))
        out.append(("C", self.out_shape, "float32"))
        return out

    def _compute(self, te, b):
        V, X = b["V"], b["X"]
        M, N, K = self.mnk
        Mp, Np, Kp = self.padded

        def col(n):
            return n if self.k is None else b["cols"][0, n]

        Ag = te.compute(
            (self.S, Kp, Mp),
            lambda s, j, m: self._guard([j < K if Kp != K else None, m < M if Mp != M else None], V[s, j, m]),
            name="A_g",
        )
        Bg = te.compute(
            (self.S, Kp, Np),
            lambda s, j, n: self._guard(
                [j < K if Kp != K else None, n < N if Np != N else None],
                X[self._pos(b["rows"], s, j, self.My), col(n)],
            ),
            name="B_g",
        )
        r = te.reduce_axis((0, Kp), name="r")
        return te.compute(
            (self.S, Mp, Np),
            lambda s, m, n: te.sum(Ag[s, r, m].astype("float32") * Bg[s, r, n].astype("float32"), axis=r),
            name="C",
        )


def problem_key(spec_dict: dict[str, Any]) -> tuple:
    """Hashable lookup key of a spec dict: every field but the tile."""
    return tuple(sorted((k, v) for k, v in spec_dict.items() if k != "tile"))


GENERATORS: dict[str, type[IndexedGemm]] = {
    c.kind: c for c in (GatherK, GatherKN, WgradT, BlockRowsData, BlockRowsWgrad, GatherRowsT)
}


def spec_from_dict(d: dict[str, Any]) -> IndexedGemm:
    """Inverse of ``spec.to_dict()``."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in GENERATORS:
        raise UnsupportedGemm(f"unknown GEMM kind {kind!r}; known: {sorted(GENERATORS)}")
    if isinstance(d.get("tile"), dict):
        d["tile"] = Tile(**d["tile"])
    return GENERATORS[kind](**d)
