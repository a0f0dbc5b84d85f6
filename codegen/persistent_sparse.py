"""Sparse persistent inference kernel of one weight-sparse LSTM layer/direction (GPU, TIR).

One launch runs the whole recurrence (technique 4 of ``../shared/papers``, "sparse persistent
RNNs"): the input projection of all steps is one dense GEMM *before* the launch (``Xg``), and
the kernel loops over the ``T`` steps with the non-zeros of ``W_hh`` on chip:

* hidden units are partitioned over ``grid`` CTAs, ``units`` per CTA, all four gate rows of a
  unit in the same CTA (row ``4*j + g`` of the format is gate ``g`` of unit ``j``), so the cell
  update is local and ``c`` stays in registers for all steps;
* each gate row's non-zeros are split over ``split`` consecutive threads (thread ``s`` takes
  entries ``s, s + split, ...``: a warp reads consecutive shared-memory words); the first
  ``reg_nnz`` entries of each thread live in registers, the rest of the row in shared memory,
  loaded ONCE before the time loop;
* per step: ``h_{t-1}`` (all ``H x B`` values, unit-major ``[k*B + b]``, so one non-zero reads
  its ``B`` batch values as one wide load) is copied from global memory into shared memory with
  16-byte loads, each thread accumulates value * h[col] over its share (fp32), the partial
  sums meet in shared memory, ``units*B`` threads do the cell update and write ``h_t`` to the
  global sequence buffer ``Hs[t + 1]``; then a grid-wide barrier.

Barrier: a monotonically growing int32 counter in global memory (``bar``, zeroed by the caller
before each launch): after step ``t`` thread 0 of each CTA fences, adds 1 and spins until the
counter reaches ``(t + 1) * grid``. It needs every CTA resident at once; the loader launches
with ``cuLaunchCooperativeKernel``, which *guarantees* that (or refuses the launch) without
the cooperative-groups ``grid.sync()`` machinery in the kernel. ``Hs`` has a row per step, so
no address is ever rewritten within a launch (no stale L1 line, no write-after-read race
between a fast and a slow CTA).

Format (run-time data: re-pruning needs no rebuild, only ``nnz`` is a build-time bound):
``Wv (grid*4*units, nnz)`` values in the kernel dtype and ``Wc`` (same shape) column indices
(int16 below 32768 columns, else int32), every row padded with ``(col 0, value 0)``, the order of a
row's entries free (the run time uses a bank-aware one). Buffers:
``Xg (T, B, 4H)`` (gate-major like ``x @ W_ih.T + b``), ``Hs (T + 1, L)`` with ``Hs[0]`` = h0
and ``Hs[t+1, j*B + b]`` = h_t (``L >= H*B`` a multiple of 128 bytes, padding zero), ``C (units*grid*B,)`` c0 in,
c_T out, ``bar (1,)`` int32. ``T`` is a run-time argument.

:func:`make_kernel` builds the CUDA function; ``twin=True`` builds the *same* macros for LLVM
with the thread loops serial and the grid barrier as a phase boundary (``for t: for cta:
[load this CTA's weights] for thread: phase``), so an index or schedule bug fails a CPU test.

Build-time only (TVM is imported inside the builders); the spec, sizes and the co-residency
arithmetic are pure Python (the loader and the docs' tables use them).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import UnsupportedGemm

GENERATOR_VERSION = "2"  # 2: the packed-word format (value + column offset in one 32-bit word)
KIND = "persistent_sparse_eval"

#: per arch: SMs of the reference part, shared memory per SM and the opt-in maximum per block
#: (bytes), 32-bit registers per SM, threads per SM (CUDA programming guide, compute
#: capability tables): A100 (sm_80), H100 SXM (sm_90)
ARCH_LIMITS = {
    "sm_80": {"sms": 108, "smem_sm": 167936, "smem_block": 166912, "regs_sm": 65536, "threads_sm": 2048,
              "blocks_sm": 32},
    "sm_90": {"sms": 132, "smem_sm": 233472, "smem_block": 232448, "regs_sm": 65536, "threads_sm": 2048,
              "blocks_sm": 32},
}
RESERVED_SMEM = 1024  # shared memory the driver reserves per CTA (sm_80 and newer)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int16": 2, "int32": 4}


def _up(x: int, m: int) -> int:
    return -(-x // m) * m


def packable(hidden_size: int, batch: int, dtype: str) -> bool:
    """Whether the packed-word format can hold this kernel's non-zeros: a 16-bit value and a
    16-bit column in one 32-bit word."""
    return dtype in ("float16", "bfloat16") and hidden_size <= 65536


@dataclass(frozen=True)
class PersistentSparseSpec:
    """Static parameters of one persistent sparse eval kernel (``T`` is a run-time argument)."""

    hidden_size: int
    batch: int
    nnz: int  # bound on non-zeros per gate row (a multiple of 8 and of split)
    dtype: str  # values, Xg, Hs, C; accumulation and the cell state in float32
    grid: int  # CTAs (all co-resident)
    split: int = 8  # threads per gate row
    reg_nnz: int = 0  # non-zeros per thread held in registers (the rest in shared memory)
    packed: bool = False  # one int32 word per non-zero: 16-bit value (high half) + column (low half)

    kind = KIND

    def __post_init__(self):
        for f in ("hidden_size", "batch", "nnz", "grid", "split"):
            if getattr(self, f) < 1:
                raise UnsupportedGemm(f"PersistentSparseSpec.{f} must be >= 1, got {getattr(self, f)}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise UnsupportedGemm(f"PersistentSparseSpec.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.nnz % 8 or self.nnz % self.split:
            raise UnsupportedGemm(f"PersistentSparseSpec.nnz ({self.nnz}) must be a multiple of 8 and of split "
                                  f"({self.split}); use PersistentSparseSpec.make")
        if self.reg_nnz < 0 or self.reg_nnz * self.split > self.nnz or (self.reg_nnz * self.split) % 8:
            raise UnsupportedGemm(f"PersistentSparseSpec.reg_nnz ({self.reg_nnz}) * split must be a multiple of 8 "
                                  f"and <= nnz ({self.nnz})")
        if self.threads > 1024:
            raise UnsupportedGemm(f"{self.threads} threads per CTA (> 1024): hidden {self.hidden_size} over "
                                  f"{self.grid} CTAs with split {self.split}; use more CTAs or a smaller split")
        if self.hidden_size * self.batch >= 2 ** 31 // 4:
            raise UnsupportedGemm("hidden_size * batch too large")
        if self.packed and not packable(self.hidden_size, self.batch, self.dtype):
            raise UnsupportedGemm(f"the packed-word format needs 16-bit values and hidden_size <= 65536 "
                                  f"(the column in 16 bits), got {self.dtype}, hidden {self.hidden_size}")

    @classmethod
    def make(cls, hidden_size: int, batch: int, nnz: int, dtype: str, grid: int, *, split: int | None = None,
             reg_nnz: int = 0, packed: bool = False) -> "PersistentSparseSpec":
        """The spec with ``nnz`` rounded up to the format's multiple and ``split`` chosen: the
        largest of 8, 4, 2, 1 that keeps the CTA at <= 1024 threads."""
        units = -(-hidden_size // grid)
        grid = -(-hidden_size // units)  # no empty CTA
        if split is None:
            split = next((s for s in (8, 4, 2, 1) if 4 * units * s <= 1024), 1)
        nnz = _up(max(nnz, 1, reg_nnz * split), max(8, split))
        return cls(hidden_size, batch, nnz, dtype, grid, split, reg_nnz, packed)

    # -- derived sizes ---------------------------------------------------------------
    @property
    def units(self) -> int:
        return -(-self.hidden_size // self.grid)

    @property
    def rows(self) -> int:
        """Gate rows per CTA."""
        return 4 * self.units

    @property
    def threads(self) -> int:
        return self.rows * self.split

    @property
    def rows_total(self) -> int:
        return self.grid * self.rows

    @property
    def smem_nnz(self) -> int:
        """Non-zeros per row held in shared memory."""
        return self.nnz - self.reg_nnz * self.split

    @property
    def idx_dtype(self) -> str:
        return "int16" if self.hidden_size < 32768 else "int32"

    @property
    def hvec(self) -> int:
        """Elements per 16-byte load of h."""
        return 16 // _BYTES[self.dtype]

    @property
    def h_len(self) -> int:
        """Row length of ``Hs``: every unit of every CTA, padded to 128 bytes so that no cache
        line holds parts of two steps (a line of ``Hs[t]`` cached in L1 while reading
        ``Hs[t - 1]`` would be stale at step ``t``)."""
        return _up(self.grid * self.units * self.batch, 128 // _BYTES[self.dtype])

    @property
    def h_smem_len(self) -> int:
        return _up(self.hidden_size * self.batch, self.hvec)

    @property
    def cell_iters(self) -> int:
        return -(-self.units * self.batch // self.threads)

    def smem_bytes(self) -> int:
        """Dynamic shared memory per CTA: weights, h_{t-1}, partial sums (16-byte aligned parts)."""
        if self.packed:  # one 4-byte word per non-zero
            w, c = _up(self.rows * self.smem_nnz * 4, 16), 0
        else:
            w = _up(self.rows * self.smem_nnz * _BYTES[self.dtype], 16)
            c = _up(self.rows * self.smem_nnz * _BYTES[self.idx_dtype], 16)
        h = _up(self.h_smem_len * _BYTES[self.dtype], 16)
        p = self.threads * self.batch * 4
        return w + c + h + p

    @property
    def name(self) -> str:
        dt = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[self.dtype]
        return (f"pse_h{self.hidden_size}_b{self.batch}_n{self.nnz}_{dt}_g{self.grid}_s{self.split}"
                f"_r{self.reg_nnz}" + ("_p" if self.packed else ""))

    def params(self) -> list[tuple[str, tuple, str]]:
        """``(buffer, shape, dtype)``; ``"T"`` marks the run-time number of steps."""
        w = ([("Wp", (self.rows_total, self.nnz), "int32")] if self.packed else
             [("Wv", (self.rows_total, self.nnz), self.dtype), ("Wc", (self.rows_total, self.nnz), self.idx_dtype)])
        return [
            ("Xg", ("T", self.batch, 4 * self.hidden_size), self.dtype),
            ("Hs", ("T+1", self.h_len), self.dtype),
            *w,
            ("C", (self.grid * self.units * self.batch,), self.dtype),
            ("bar", (1,), "int32"),
        ]

    def to_dict(self) -> dict:
        return {"generator": f"{KIND}-{GENERATOR_VERSION}", "kind": KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "PersistentSparseSpec":
        fields = ("hidden_size", "batch", "nnz", "dtype", "grid", "split", "reg_nnz")
        return cls(**{k: d[k] for k in fields}, packed=bool(d.get("packed", False)))  # bundles of version 1: unpacked

    def describe(self) -> str:
        return (f"persistent sparse eval: hidden {self.hidden_size}, batch {self.batch}, <= {self.nnz} non-zeros "
                f"per gate row, {self.dtype}, {self.grid} CTAs x {self.threads} threads, {self.smem_bytes()} B "
                "shared memory")


# -- co-residency -------------------------------------------------------------------------

def blocks_per_sm(arch: str, threads: int, registers: int, smem_bytes: int) -> int:
    """CTAs of one kernel resident per SM (the occupancy calculator's arithmetic): registers
    allocated per warp in units of 256, ``RESERVED_SMEM`` per CTA, thread and CTA limits."""
    lim = ARCH_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = _up(max(registers, 1) * 32, 256)
    by_regs = (lim["regs_sm"] // regs_per_warp) // warps
    by_smem = lim["smem_sm"] // (smem_bytes + RESERVED_SMEM) if smem_bytes + RESERVED_SMEM <= lim["smem_sm"] else 0
    if smem_bytes > lim["smem_block"]:
        by_smem = 0
    by_threads = lim["threads_sm"] // threads
    return max(0, min(by_regs, by_smem, by_threads, lim["blocks_sm"]))


def coresidency_problem(spec: PersistentSparseSpec, arch: str, registers: int,
                        smem_bytes: int | None = None) -> str | None:
    """Why ``spec``'s grid cannot be co-resident on ``arch`` (None: it can); ``smem_bytes``: the
    dynamic shared memory TVM allocates (the build checks it equals ``spec.smem_bytes()``, the
    default)."""
    if arch not in ARCH_LIMITS:
        return f"no co-residency limits known for {arch} (known: {sorted(ARCH_LIMITS)})"
    lim = ARCH_LIMITS[arch]
    smem = spec.smem_bytes() if smem_bytes is None else smem_bytes
    per_sm = blocks_per_sm(arch, spec.threads, registers, smem)
    if spec.grid <= per_sm * lim["sms"]:
        return None
    return (f"{spec.name}: {spec.grid} CTAs cannot be co-resident on {arch} ({lim['sms']} SMs x {per_sm} CTA(s) "
            f"per SM: {spec.threads} threads x {registers} registers, {smem} B shared memory per CTA, limits "
            f"{lim['regs_sm']} registers and {lim['smem_sm']} B per SM, {lim['smem_block']} B per CTA); "
            "lower the non-zero bound (prune more), hold more non-zeros in registers (reg_nnz) or "
            "use a smaller hidden size")


def grid_for(arch: str, sms: int | None = None) -> int:
    """The grid of a persistent kernel for ``arch``: one CTA per SM of a part with ``sms`` SMs,
    by default the arch's reference part (``ARCH_LIMITS``: A100 108, H100 SXM/H200 132). A part
    with fewer SMs of the same arch (A30 56, H100 PCIe 114) needs its own, smaller grid: the
    reference grid is not co-resident there."""
    if arch not in ARCH_LIMITS:
        raise UnsupportedGemm(f"persistent kernels are built for {sorted(ARCH_LIMITS)}, not {arch}")
    ref = ARCH_LIMITS[arch]["sms"]
    if sms is None:
        return ref
    if isinstance(sms, bool) or not isinstance(sms, int) or not 1 <= sms <= ref:
        raise UnsupportedGemm(f"an SM count for {arch} must be an integer in 1..{ref} (its largest part has {ref} "
                              f"SMs), got {sms!r}")
    return sms


def spec_for_arch(hidden_size: int, batch: int, nnz: int, dtype: str, arch: str, *,
                  reg_nnz: int | None = None, sms: int | None = None) -> PersistentSparseSpec:
    """One CTA per SM of ``arch``'s reference part, or of a part with ``sms`` SMs
    (:func:`grid_for`); ``reg_nnz`` (default) moves non-zeros from shared memory into registers
    until the shared memory fits one CTA per SM (at most 24 per thread: 48 registers of values
    and columns). 16-bit kernels use the packed-word format where it fits (:func:`packable`)."""
    grid = grid_for(arch, sms)
    lim = ARCH_LIMITS[arch]
    pk = packable(hidden_size, batch, dtype)
    spec = PersistentSparseSpec.make(hidden_size, batch, nnz, dtype, grid, packed=pk)
    if reg_nnz is not None:
        return PersistentSparseSpec.make(hidden_size, batch, nnz, dtype, grid, split=spec.split,
                                         reg_nnz=reg_nnz, packed=pk)
    r = 0
    while spec.smem_bytes() + RESERVED_SMEM > lim["smem_block"] and r < 24 and (r + 1) * spec.split <= spec.nnz:
        r += 1
        if (r * spec.split) % 8:
            continue
        spec = replace(spec, reg_nnz=r)
    return spec


def estimated_registers(spec: PersistentSparseSpec) -> int:
    """Registers per thread, a conservative fit of ptxas's counts (sm_80/sm_90, CUDA 13:
    36-40 at ``reg_nnz`` 0, 48 at 6, 56 at 12, 77 at 24; batch 8: 80 at 24)."""
    return 40 + 2 * spec.reg_nnz + 2 * max(0, spec.batch - 4)


def fits(hidden_size: int, density: float, arch: str, *, dtype: str = "bfloat16", batch: int = 4,
         registers_of=None) -> PersistentSparseSpec | None:
    """The spec of a layer of ``hidden_size`` at ``density`` (row bound :func:`nnz_bound`) when
    its grid is co-resident on ``arch`` (registers from ``registers_of(spec)``, default
    :func:`estimated_registers`), else None."""
    spec = spec_for_arch(hidden_size, batch, nnz_bound(hidden_size, density), dtype, arch)
    if spec.smem_bytes() + RESERVED_SMEM > ARCH_LIMITS[arch]["smem_block"]:
        return None
    regs = (registers_of or estimated_registers)(spec)
    return spec if coresidency_problem(spec, arch, regs) is None else None


def max_hidden_size(density: float, arch: str, *, step: int = 16, **kw) -> int:
    """The largest hidden size (a multiple of ``step``) whose layer fits on chip (:func:`fits`);
    binary search, assuming that a smaller layer fits when a larger one does."""
    lo, hi = 0, 1
    while fits(hi * step, density, arch, **kw):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * step, density, arch, **kw):
            lo = mid
        else:
            hi = mid
    return lo * step


# -- TIR ----------------------------------------------------------------------------------

def _sig(T, x):
    return T.float32(1.0) / (T.float32(1.0) + T.exp(-x))


def grid_barrier():
    """The grid barrier of the persistent kernels (this module's and ``persistent_train``'s), a
    ``T.macro`` ``barrier(bar, seen, tx, t, G)`` for the end of step ``t``: ``__syncthreads``;
    thread 0 releases the CTA's stores (``__threadfence``), adds 1 to the launch's counter ``bar``
    and spins (relaxed polls, closing acquire) until all ``G`` CTAs have arrived, i.e.
    ``bar >= (t + 1) * G`` (the counter only grows); ``__syncthreads``. CUDA kernels only: a twin
    runs the steps as phases instead."""
    from tvm.script import tirx as T

    @T.macro
    def barrier(bar, seen, tx, t, G):
        T.tvm_storage_sync("shared")
        if tx == 0:
            T.evaluate(T.cuda.thread_fence())
            T.evaluate(T.cuda.atomic_add(T.address_of(bar[0]), 1))
            T.evaluate(T.cuda.wait_until(seen, T.address_of(bar[0]), seen[0] >= (t + 1) * G))
        T.tvm_storage_sync("shared")

    return barrier


def make_kernel(spec: PersistentSparseSpec, *, twin: bool = False):
    """The PrimFunc: the CUDA kernel, or with ``twin=True`` its CPU twin (same macros, thread
    loops serial, the grid barrier a phase boundary)."""
    from tvm.script import tirx as T

    barrier = grid_barrier()

    H, B, NNZ, dt = spec.hidden_size, spec.batch, spec.nnz, spec.dtype
    G, U, S, RN = spec.grid, spec.units, spec.split, spec.reg_nnz
    R4, NT, NS = spec.rows, spec.threads, spec.smem_nnz
    P = spec.packed
    idt = spec.idx_dtype
    L, LS, HV = spec.h_len, spec.h_smem_len, spec.hvec
    WDT = "int32" if P else dt  # the shared weight array: packed words, or the values
    VV = 16 // _BYTES[WDT]  # elements per 16-byte load of the values (words) / columns
    VC = 16 // _BYTES[idt]
    CI = spec.cell_iters
    RNb = max(RN, 1)
    NSb = max(NS, 1)
    f32 = "float32"
    WCH = (R4 * NS) // VV  # 16-byte chunks of this CTA's shared values
    CCH = (R4 * NS) // VC
    # chunks per row (>= 1 so the copy's index arithmetic is defined when every non-zero is
    # in registers, NS = 0: WCH = CCH = 0 and the copy loops are empty)
    RCV, RCC = max(NS // VV, 1), max(NS // VC, 1)
    HCH = LS // HV
    # the batch loop of the dot product in vectors of BV (one wide load of h per vector): the
    # largest power of two <= 4 dividing B (TVM 0.27's CUDA codegen breaks on float32x8)
    BV = max(v for v in (1, 2, 4) if B % v == 0)

    def word_value(w):
        """The value of a packed word (its high half) as float32: a bf16 is the high half of a
        float32, so masking is the whole conversion; an fp16 is shifted down and converted."""
        if dt == "bfloat16":
            return T.reinterpret(f32, T.bitwise_and(w, T.int32(-65536)))
        return T.Cast(f32, T.reinterpret("float16", T.Cast("uint16", T.shift_right(w, 16))))

    def word_column(w):
        """The column of a packed word (its low half; ``* B`` is the offset of ``h[column, 0]``,
        written at the use so TVM sees the batch vector's alignment and loads it in one piece)."""
        return T.bitwise_and(w, T.int32(65535))

    @T.macro
    def load_regs(Wv, Wc, bx, tx, wr_v, wr_c, rb):
        # thread tx = r*S + s holds entries j*S + s (j < RN) of its row r
        for j in T.unroll(RN):
            if P:
                wr_v[rb + j] = word_value(Wv[bx * R4 + tx // S, j * S + tx % S])
                wr_c[rb + j] = word_column(Wv[bx * R4 + tx // S, j * S + tx % S])
            else:
                wr_v[rb + j] = T.Cast(f32, Wv[bx * R4 + tx // S, j * S + tx % S])
                wr_c[rb + j] = T.Cast("int32", Wc[bx * R4 + tx // S, j * S + tx % S])

    @T.macro
    def load_smem_w(Wv, Wc, bx, tx, wv_s, wc_s):
        # the CTA's rows, entries RN*S.., as 16-byte chunks (NS and RN*S are multiples of 8)
        for i in range((WCH + NT - 1) // NT):
            if i * NT + tx < WCH:
                for v in T.vectorized(VV):
                    wv_s[(i * NT + tx) * VV + v] = Wv[bx * R4 + (i * NT + tx) // RCV,
                                                      RN * S + (i * NT + tx) % RCV * VV + v]
        if not P:
            for i in range((CCH + NT - 1) // NT):
                if i * NT + tx < CCH:
                    for v in T.vectorized(VC):
                        wc_s[(i * NT + tx) * VC + v] = Wc[bx * R4 + (i * NT + tx) // RCC,
                                                          RN * S + (i * NT + tx) % RCC * VC + v]

    @T.macro
    def load_h(Hs, t, tx, hs_s):
        for i in range((HCH + NT - 1) // NT):
            if i * NT + tx < HCH:
                for v in T.vectorized(HV):
                    hs_s[(i * NT + tx) * HV + v] = Hs[t, (i * NT + tx) * HV + v]

    @T.macro
    def dot(tx, wr_v, wr_c, rb, wv_s, wc_s, hs_s, part_s, acc):
        for b in T.unroll(B):
            acc[b] = T.float32(0)
        # one non-zero reads its B batch values of h as one wide shared-memory load
        for j in T.unroll(RN):
            for bo in T.unroll(B // BV):
                for b in T.vectorized(BV):
                    acc[bo * BV + b] = acc[bo * BV + b] + wr_v[rb + j] * T.Cast(
                        f32, hs_s[wr_c[rb + j] * B + bo * BV + b])
        for j in range(NS // S):
            if P:  # one 32-bit shared load per non-zero: value and offset of h[column]
                for bo in T.unroll(B // BV):
                    for b in T.vectorized(BV):
                        acc[bo * BV + b] = acc[bo * BV + b] + word_value(wv_s[(tx // S) * NS + j * S + tx % S]) * T.Cast(
                            f32, hs_s[word_column(wv_s[(tx // S) * NS + j * S + tx % S]) * B + bo * BV + b])
            else:
                for bo in T.unroll(B // BV):
                    for b in T.vectorized(BV):
                        acc[bo * BV + b] = acc[bo * BV + b] + T.Cast(f32, wv_s[(tx // S) * NS + j * S + tx % S]) * T.Cast(
                            f32, hs_s[T.Cast("int32", wc_s[(tx // S) * NS + j * S + tx % S]) * B + bo * BV + b])
        for b in T.unroll(B):
            part_s[tx * B + b] = acc[b]

    @T.macro
    def cell(Xg, Hs, bx, tx, t, part_s, gs, cst, ci):
        # thread i*NT + tx < U*B owns (unit bx*U + u, batch b); the partial sums of gate row
        # 4u + g sit at part_s[((4u + g)*S + s)*B + b]
        for i in range(CI):
            if i * NT + tx < U * B:
                if bx * U + (i * NT + tx) // B < H:
                    for g in T.unroll(4):
                        gs[g] = T.Cast(f32, Xg[t, (i * NT + tx) % B, g * H + bx * U + (i * NT + tx) // B])
                        for s in T.unroll(S):
                            gs[g] = gs[g] + part_s[((((i * NT + tx) // B) * 4 + g) * S + s) * B + (i * NT + tx) % B]
                    cst[ci + i] = _sig(T, gs[1]) * cst[ci + i] + _sig(T, gs[0]) * T.tanh(gs[2])
                    Hs[t + 1, (bx * U + (i * NT + tx) // B) * B + (i * NT + tx) % B] = T.Cast(
                        dt, _sig(T, gs[3]) * T.tanh(cst[ci + i]))

    @T.macro
    def load_c(C, bx, tx, cst, ci):
        for i in range(CI):
            if i * NT + tx < U * B:
                cst[ci + i] = T.Cast(f32, C[bx * U * B + i * NT + tx])

    @T.macro
    def store_c(C, bx, tx, cst, ci):
        for i in range(CI):
            if i * NT + tx < U * B:
                C[bx * U * B + i * NT + tx] = T.Cast(dt, cst[ci + i])

    def entry(body, symbol):
        """The PrimFunc around ``body`` (the kernel's or the twin's): the packed-word format takes
        one weight buffer (``Wp``, passed to ``body`` as both arrays), the other two."""
        if P:
            @T.prim_func
            def packed(xg_h: T.handle, hs_h: T.handle, wp_h: T.handle, c_h: T.handle, bar_h: T.handle):
                T.func_attr({"global_symbol": symbol, "tirx.noalias": True})
                Tn = T.int32()
                Xg = T.match_buffer(xg_h, (Tn, B, 4 * H), dt)
                Hs = T.match_buffer(hs_h, (Tn + 1, L), dt)
                Wp = T.match_buffer(wp_h, (G * R4, NNZ), "int32")
                C = T.match_buffer(c_h, (G * U * B,), dt)
                bar = T.match_buffer(bar_h, (1,), "int32")
                body(Xg, Hs, Wp, Wp, C, bar, Tn)

            return packed

        @T.prim_func
        def arrays(xg_h: T.handle, hs_h: T.handle, wv_h: T.handle, wc_h: T.handle, c_h: T.handle,
                   bar_h: T.handle):
            T.func_attr({"global_symbol": symbol, "tirx.noalias": True})
            Tn = T.int32()
            Xg = T.match_buffer(xg_h, (Tn, B, 4 * H), dt)
            Hs = T.match_buffer(hs_h, (Tn + 1, L), dt)
            Wv = T.match_buffer(wv_h, (G * R4, NNZ), dt)
            Wc = T.match_buffer(wc_h, (G * R4, NNZ), idt)
            C = T.match_buffer(c_h, (G * U * B,), dt)
            bar = T.match_buffer(bar_h, (1,), "int32")
            body(Xg, Hs, Wv, Wc, C, bar, Tn)

        return arrays

    @T.macro
    def cuda_body(Xg, Hs, Wv, Wc, C, bar, Tn):
        bx = T.launch_thread("blockIdx.x", G)
        tx = T.launch_thread("threadIdx.x", NT)
        wv_s = T.alloc_buffer((R4 * NSb,), WDT, scope="shared.dyn")
        if P:
            wc_s = wv_s  # the words hold the columns too
        else:
            wc_s = T.alloc_buffer((R4 * NSb,), idt, scope="shared.dyn")
        hs_s = T.alloc_buffer((LS,), dt, scope="shared.dyn")
        part_s = T.alloc_buffer((NT * B,), f32, scope="shared.dyn")
        wr_v = T.alloc_buffer((RNb,), f32, scope="local")
        wr_c = T.alloc_buffer((RNb,), "int32", scope="local")
        acc = T.alloc_buffer((B,), f32, scope="local")
        gs = T.alloc_buffer((4,), f32, scope="local")
        cst = T.alloc_buffer((CI,), f32, scope="local")
        seen = T.alloc_buffer((1,), "int32", scope="local")
        load_regs(Wv, Wc, bx, tx, wr_v, wr_c, 0)
        load_smem_w(Wv, Wc, bx, tx, wv_s, wc_s)
        load_c(C, bx, tx, cst, 0)
        for t in range(Tn):
            load_h(Hs, t, tx, hs_s)
            T.tvm_storage_sync("shared")
            dot(tx, wr_v, wr_c, 0, wv_s, wc_s, hs_s, part_s, acc)
            T.tvm_storage_sync("shared")
            cell(Xg, Hs, bx, tx, t, part_s, gs, cst, 0)
            # grid barrier: h_t of every CTA is in Hs[t + 1] before anyone reads it
            barrier(bar, seen, tx, t, G)
        store_c(C, bx, tx, cst, 0)

    if not twin:
        return entry(cuda_body, spec.name)

    @T.macro
    def twin_body(Xg, Hs, Wv, Wc, C, bar, Tn):
        # a CTA's shared memory and its threads' registers, reused CTA after CTA
        wv_s = T.alloc_buffer((R4 * NSb,), WDT)
        if P:
            wc_s = wv_s
        else:
            wc_s = T.alloc_buffer((R4 * NSb,), idt)
        hs_s = T.alloc_buffer((LS,), dt)
        part_s = T.alloc_buffer((NT * B,), f32)
        wr_v = T.alloc_buffer((NT * RNb,), f32)
        wr_c = T.alloc_buffer((NT * RNb,), "int32")
        acc = T.alloc_buffer((B,), f32)
        gs = T.alloc_buffer((4,), f32)
        cst = T.alloc_buffer((G * NT * CI,), f32)  # every thread's c, alive across steps
        for bx in range(G):
            for tx in range(NT):
                load_c(C, bx, tx, cst, (bx * NT + tx) * CI)
        for t in range(Tn):
            for bx in range(G):
                for tx in range(NT):
                    load_regs(Wv, Wc, bx, tx, wr_v, wr_c, tx * RNb)
                for tx in range(NT):
                    load_smem_w(Wv, Wc, bx, tx, wv_s, wc_s)
                for tx in range(NT):
                    load_h(Hs, t, tx, hs_s)
                for tx in range(NT):  # cta_sync
                    dot(tx, wr_v, wr_c, tx * RNb, wv_s, wc_s, hs_s, part_s, acc)
                for tx in range(NT):  # cta_sync
                    cell(Xg, Hs, bx, tx, t, part_s, gs, cst, (bx * NT + tx) * CI)
            bar[0] = bar[0] + G  # the grid barrier: the next step starts after every CTA's step
        for bx in range(G):
            for tx in range(NT):
                store_c(C, bx, tx, cst, (bx * NT + tx) * CI)

    return entry(twin_body, spec.name + "_twin")


def build_twin(spec: PersistentSparseSpec):
    """The CPU twin compiled for LLVM (a module; call ``mod[spec.name + "_twin"](...)``)."""
    import tvm

    from .toolchain import import_tvm

    import_tvm()
    return tvm.compile(tvm.IRModule({spec.name + "_twin": make_kernel(spec, twin=True)}), target="llvm")


def dynamic_smem_bytes(mod, target) -> int:
    """Bytes of dynamic shared memory TVM's lowering allocates for the kernel of ``mod``
    (its merged ``shared.dyn`` buffer; the launch must pass this size)."""
    import re

    import tvm

    host = tvm.target.Target("llvm")
    lowered = tvm.tirx.transform.BindTarget(target.with_host(host))(mod)
    pipe, _, _ = tvm.tirx.get_tir_pipeline("s_tir")
    lowered = pipe(lowered)
    sizes = [int(m.group(1)) for f in lowered.functions.values()
             for m in re.finditer(r'buf_dyn_shmem = T\.alloc_buffer\(\((\d+),\), "uint8"', str(f))]
    if len(sizes) != 1:
        from .errors import CodegenError

        raise CodegenError(f"expected one merged dynamic shared-memory buffer, found {sizes}")
    return sizes[0]


@dataclass(frozen=True)
class PersistentEvalRequest:
    """What ``rnn-sparsify compile --persistent-eval`` asks for; one kernel per arch is built
    from it (:func:`spec_for_arch`)."""

    hidden_size: int
    batch: int
    nnz: int  # bound on non-zeros per gate row of W_hh
    dtype: str
    sms: int | None = None  # SMs of the target part (the grid); None: the arch's reference part

    def describe(self) -> str:
        return (f"hidden {self.hidden_size}, batch {self.batch}, <= {self.nnz} non-zeros per gate row "
                f"({self.nnz / self.hidden_size:.0%}), {self.dtype}"
                + (f", {self.sms} SMs" if self.sms else ""))


def nnz_bound(hidden_size: int, density: float) -> int:
    """A per-row bound for a random mask of ``density``: the mean plus 5 standard deviations
    of a binomial row count (rows of magnitude-pruned matrices vary more: pass the measured
    maximum, :func:`rnn_sparsify.kernels.persistent_eval.row_nnz_max`, when the model is at
    hand)."""
    import math

    mean = density * hidden_size
    return min(hidden_size, math.ceil(mean + 5 * math.sqrt(max(mean * (1 - density), 1.0))))


def cuda_source(spec: PersistentSparseSpec, arch: str) -> str:
    """The generated CUDA source of the kernel for ``arch``."""
    from .toolchain import import_tvm

    tvm = import_tvm()
    lib = tvm.compile(tvm.IRModule({spec.name: make_kernel(spec)}),
                      target=tvm.target.Target({"kind": "cuda", "arch": arch}))
    return lib.mod.imports[0].inspect_source("cuda")


__all__ = ["ARCH_LIMITS", "KIND", "PersistentEvalRequest", "PersistentSparseSpec", "blocks_per_sm", "build_twin",
           "coresidency_problem", "cuda_source", "dynamic_smem_bytes", "estimated_registers", "fits", "grid_for",
           "make_kernel",
           "max_hidden_size", "nnz_bound", "spec_for_arch"]
