"""Persistent recurrent loops for sparse *training* of one LSTM layer/direction (GPU, TIR).

Issue 9, item 2. Two kernels, each one launch for all ``T`` steps, with the grid barrier,
the co-residency rules and the twin scheme of :mod:`.persistent_sparse` (item 1):

**forward** (``fwd``): per step ``t`` the recurrent GEMM over the kept units ``J_t`` of
``h_{t-1}`` (structured RH dropout: one mask per step shared by the batch, the padded index
array ``idx (T, K)`` of the CPU kernels, entries ``>= H`` are padding; inverted scaling ``a =
H / k`` folded into the gathered ``h``, as ``codegen/cpu_lstm.py``'s ``Ak``), plus ``Xg[t]``
(input projection and biases, precomputed outside), the fused cell update, and stores of what
the backward needs: activations ``i, f, g, o`` (``Ac``), ``c_t`` (``Cs``), ``h_t`` (``Hs``).

* Row partition: CTA ``bx`` owns units ``[bx*U, bx*U + U)`` and their 4 gate rows of
  ``W_hh`` (row ``4u + g`` = gate ``g`` of unit ``u``), so the cell update is CTA-local. The
  rows are copied into shared memory once, transposed (``w_s[col*4U + row]``): the 4U threads
  that work on one kept column read 4U consecutive values (conflict-free).
* Per step: ``idx[t]`` and ``a * h_{t-1}[J_t]`` (float32, ``[k*B + b]``) are gathered from
  global memory into shared memory; thread ``tx = s*4U + r`` accumulates row ``r`` over the
  kept positions ``s, s + FS, ...`` for all ``B`` batch columns (fp32; ``h`` of one position
  is one wide shared load, a broadcast across the warp); the ``FS`` partial sums of a row meet
  in shared memory; ``U*B`` threads do the cell update; then the grid barrier. One grid
  barrier per step.

**backward-data** (``bwd``), t = T-1 .. 0: ``dNet_t`` from ``dh_t = dY[t] + dh_rec``,
``dc_t`` and the stored activations (fused, element-wise), optional **coarse gate-gradient
selection** (``(P, R, S)``, ``docs/semantics.md``), then ``dh_{t-1}[J_t] = a * dNet_t @
W_hh[:, J_t]`` and ``dc_{t-1} = dc_t * f``. ``dNet`` of every step is an output (``Dn (T, 4H,
B)``, selected), so the weight gradient is one GEMM afterwards (outside, torch).

* **Column partition** (the transposed product needs no cross-CTA reduction): CTA ``bx``
  owns the same units ``[bx*U, bx*U + U)``, and holds the *columns* ``W_hh[:, u]`` of its
  units (``4H x U``, unit-major in shared memory). Phase 1 (before the barrier): the
  element-wise part for its units writes ``dNet_t[:, own columns]`` to ``Dn[t]`` (and, for
  coarse selection, each column's squared norm over the batch to ``Sq[t]``). Grid barrier.
  Phase 2: every CTA reads all of ``dNet_t`` (``4H x B``, from L2) and computes
  ``dh_{t-1}[:, u]`` for its own *kept* units ``u`` (warp-per-unit, ``BS`` threads over the
  4H rows, partial sums reduced in shared memory). ``dh`` and ``dc`` never leave their CTA.
  **One grid barrier per step**, at the price of every CTA reading ``dNet_t`` (``8·H·B``
  bytes in bf16) and of load imbalance (a CTA's share of kept units varies per step).
  Alternative not taken: the row partition of the forward with partial sums
  ``(B, K)`` per CTA written to global memory, a barrier, and a reduction by the owners (two
  barriers per step, ``4·K·B`` bytes written + ``4·H·B`` read per CTA, balanced).
* **Coarse selection, fused without an extra barrier**: slices of ``P`` consecutive
  gate-order columns and regions of ``R`` slices span CTAs whenever ``H`` is not a multiple of
  ``P*R`` (regions cross gate boundaries). After the barrier every CTA reads all ``4H``
  column norms ``Sq[t]`` (``16·H`` bytes), and computes the same slice scores (the same
  float32 sums in the same order: bit-identical in every CTA) and the same kept set
  (rank within the region by (score, index), ``S*r // R`` dropped in a last partial region,
  non-finite scores rank as the largest), then multiplies only kept rows; each CTA zeroes
  the dropped columns it owns in ``Dn[t]`` (no other CTA reads them). CTA 0 writes the
  kept flags ``Kp (T, 4H/P)`` (for the block-sparse weight gradient). Fine (``My, Mx, K``)
  and meProp selection are **not** fused (a backend must fall back to the per-step path).

Storage: ``W`` in the kernel dtype (float32, float16 or bfloat16) in shared memory, fp32
accumulation; ``h`` (``Hs``) and ``dNet`` (``Dn``) in the kernel dtype (the 16-bit ones are the
GEMM inputs of the weight gradient); ``Ac``, ``Cs``, ``dY``, ``DH``, ``DC`` in float32.
Unit-major layouts with the batch innermost (``[j*B + b]``) like item 1.

:func:`make_kernel` builds the CUDA kernel; ``twin=True`` the CPU twin: the *same* macros
with the thread loops serial, each grid barrier a phase boundary (``for t: for cta: for
thread: phase``), shared memory as per-CTA scratch reloaded for every CTA, built for LLVM.

Build-time only (TVM imported inside the builders); specs and capacity arithmetic are pure
Python.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UnsupportedGemm
from .persistent_sparse import ARCH_LIMITS, RESERVED_SMEM, blocks_per_sm, grid_barrier, grid_for

GENERATOR_VERSION = "1"
KIND_FWD = "persistent_train_fwd"
KIND_BWD = "persistent_train_bwd"
KINDS = (KIND_FWD, KIND_BWD)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _up(x: int, m: int) -> int:
    return -(-x // m) * m


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PersistentTrainSpec:
    """Static parameters of one persistent training kernel (``T`` is a run-time argument).

    ``part``: ``"fwd"`` or ``"bwd"``. ``keep``: width of the kept-unit index array (the kept
    count of structured RH dropout, ``H`` without dropout: pass ``idx = arange(H)``).
    ``split``: threads per gate row over the kept positions (fwd) or threads per unit over the
    4H rows (bwd). ``coarse``: ``(P, R, S)`` of fused coarse selection (bwd only)."""

    part: str
    hidden_size: int
    batch: int
    keep: int
    dtype: str
    grid: int
    split: int
    coarse: tuple = ()

    def __post_init__(self):
        if self.part not in ("fwd", "bwd"):
            raise UnsupportedGemm(f"PersistentTrainSpec.part must be 'fwd' or 'bwd', got {self.part!r}")
        for f in ("hidden_size", "batch", "keep", "grid", "split"):
            if getattr(self, f) < 1:
                raise UnsupportedGemm(f"PersistentTrainSpec.{f} must be >= 1, got {getattr(self, f)}")
        if self.dtype not in _BYTES:
            raise UnsupportedGemm(f"PersistentTrainSpec.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.keep > self.hidden_size:
            raise UnsupportedGemm(f"PersistentTrainSpec.keep ({self.keep}) > hidden_size ({self.hidden_size})")
        if self.coarse:
            if self.part != "bwd" or len(self.coarse) != 3:
                raise UnsupportedGemm("PersistentTrainSpec.coarse is (P, R, S) of the backward kernel")
            P, R, S = self.coarse
            if P < 1 or R < 1 or not 0 <= S < R or (4 * self.hidden_size) % P:
                raise UnsupportedGemm(f"coarse selection (P={P}, R={R}, S={S}) needs P | 4H and 0 <= S < R")
        if self.threads > 1024:
            raise UnsupportedGemm(f"{self.threads} threads per CTA (> 1024): {self.describe()}")

    @classmethod
    def make(cls, part: str, hidden_size: int, batch: int, keep: int, dtype: str, grid: int, *,
             split: int | None = None, coarse: tuple = ()) -> "PersistentTrainSpec":
        """``grid`` trimmed to have no empty CTA; ``split`` the largest power of two <= 8
        (fwd) or 32 (bwd, a warp per unit) that keeps the CTA at <= 1024 threads."""
        units = _cdiv(hidden_size, grid)
        grid = _cdiv(hidden_size, units)
        if split is None:
            per = 4 * units if part == "fwd" else units
            top = 8 if part == "fwd" else 32
            split = next((s for s in (top, top // 2, top // 4, top // 8, 2, 1) if s >= 1 and per * s <= 1024), 1)
        return cls(part, hidden_size, batch, keep, dtype, grid, split, tuple(coarse))

    # -- derived sizes -------------------------------------------------------------------
    scalars = ("a",)  # scalar kernel parameters besides Tn (the dropout scale)

    @property
    def kind(self) -> str:
        return KIND_FWD if self.part == "fwd" else KIND_BWD

    @property
    def units(self) -> int:
        return _cdiv(self.hidden_size, self.grid)

    @property
    def rows(self) -> int:
        return 4 * self.units

    @property
    def threads(self) -> int:
        return (self.rows if self.part == "fwd" else self.units) * self.split

    @property
    def slots(self) -> int:
        """Unit slots of the grid (``>= H``): the length of a step of the unit-major buffers / B."""
        return self.grid * self.units

    @property
    def h_len(self) -> int:
        """Row length of ``Hs`` (padded to 128 bytes: no cache line holds parts of two steps)."""
        return _up(self.slots * self.batch, 128 // _BYTES[self.dtype])

    @property
    def n_slices(self) -> int:
        return 4 * self.hidden_size // self.coarse[0] if self.coarse else 0

    def smem_parts(self) -> dict:
        """Dynamic shared memory per CTA by buffer (bytes, each part 16-byte aligned)."""
        H, B, K, U, NT, db = self.hidden_size, self.batch, self.keep, self.units, self.threads, _BYTES[self.dtype]
        if self.part == "fwd":
            parts = {"w": self.rows * H * db, "idx": K * 4, "h": K * B * 4, "part": NT * B * 4}
        else:
            parts = {"w": U * 4 * H * db, "member": U * 4, "part": NT * B * 4}
            if self.coarse:
                parts.update({"dnet_local": 4 * U * B * 4, "scores": self.n_slices * 4, "kept": self.n_slices * 4})
        return {k: _up(v, 16) for k, v in parts.items()}

    def smem_bytes(self) -> int:
        return sum(self.smem_parts().values())

    @property
    def name(self) -> str:
        dt = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[self.dtype]
        co = "_c{}x{}x{}".format(*self.coarse) if self.coarse else ""
        return (f"pt{self.part}_h{self.hidden_size}_b{self.batch}_k{self.keep}_{dt}_g{self.grid}"
                f"_s{self.split}{co}")

    def params(self) -> list[tuple[str, tuple, str]]:
        """``(buffer, shape, dtype)``; ``"T"`` marks the run-time number of steps; the scale
        ``a`` and ``Tn`` are scalar kernel parameters."""
        H, B, K, dt, SB = self.hidden_size, self.batch, self.keep, self.dtype, self.slots * self.batch
        if self.part == "fwd":
            return [("Xg", ("T", B, 4 * H), dt), ("idx", ("T", K), "int32"), ("W", (self.grid * self.rows, H), dt),
                    ("Hs", ("T+1", self.h_len), dt), ("Cs", ("T+1", SB), "float32"),
                    ("Ac", ("T", 4 * SB), "float32"), ("bar", (1,), "int32")]
        p = [("dY", ("T", SB), "float32"), ("Ac", ("T", 4 * SB), "float32"), ("Cs", ("T+1", SB), "float32"),
             ("idx", ("T", K), "int32"), ("Wb", (self.slots, 4 * H), dt), ("DH", (SB,), "float32"),
             ("DC", (SB,), "float32"), ("Dn", ("T", 4 * H * B), dt), ("bar", (1,), "int32")]
        if self.coarse:
            p += [("Sq", ("T", 4 * H), "float32"), ("Kp", ("T", self.n_slices), "int32")]
        return p

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coarse"] = list(self.coarse)
        return {"generator": f"{self.kind}-{GENERATOR_VERSION}", "kind": self.kind, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "PersistentTrainSpec":
        f = ("part", "hidden_size", "batch", "keep", "dtype", "grid", "split")
        return cls(**{k: d[k] for k in f}, coarse=tuple(d.get("coarse", ())))

    def describe(self) -> str:
        sel = " + coarse {}/{}/{}".format(*self.coarse) if self.coarse else ""
        return (f"persistent train {self.part}{sel}: hidden {self.hidden_size}, batch {self.batch}, {self.keep} kept "
                f"units/step, {self.dtype}, {self.grid} CTAs x {self.threads} threads")


# -- arch choice and capacity ----------------------------------------------------------------

def spec_for_arch(part: str, hidden_size: int, batch: int, keep: int, dtype: str, arch: str, *,
                  coarse: tuple = (), sms: int | None = None) -> PersistentTrainSpec:
    """One CTA per SM of ``arch``'s reference part (``ARCH_LIMITS``), or of a part with ``sms``
    SMs (:func:`~.persistent_sparse.grid_for`); the forward's split is halved (8 -> 4 -> 2 -> 1)
    until the shared memory fits, if it can."""
    grid = grid_for(arch, sms)
    lim = ARCH_LIMITS[arch]
    spec = PersistentTrainSpec.make(part, hidden_size, batch, keep, dtype, grid, coarse=coarse)
    while spec.smem_bytes() + RESERVED_SMEM > lim["smem_block"] and spec.split > 1:
        spec = PersistentTrainSpec.make(part, hidden_size, batch, keep, dtype, grid, split=spec.split // 2,
                                        coarse=coarse)
    return spec


def coresidency_problem(spec: PersistentTrainSpec, arch: str, registers: int, smem_bytes: int | None = None) -> str | None:
    """Why ``spec``'s grid cannot be co-resident on ``arch`` (None: it can)."""
    if arch not in ARCH_LIMITS:
        return f"no co-residency limits known for {arch} (known: {sorted(ARCH_LIMITS)})"
    lim = ARCH_LIMITS[arch]
    smem = spec.smem_bytes() if smem_bytes is None else smem_bytes
    per_sm = blocks_per_sm(arch, spec.threads, registers, smem)
    if spec.grid <= per_sm * lim["sms"]:
        return None
    return (f"{spec.name}: {spec.grid} CTAs cannot be co-resident on {arch} ({lim['sms']} SMs x {per_sm} CTA(s) per "
            f"SM: {spec.threads} threads x {registers} registers, {smem} B shared memory per CTA, limits "
            f"{lim['regs_sm']} registers and {lim['smem_sm']} B per SM, {lim['smem_block']} B per CTA); W_hh "
            "of this hidden size does not fit on chip: use the per-step kernels")


def estimated_registers(spec: PersistentTrainSpec) -> int:
    """Registers per thread, a conservative fit of ptxas (CUDA 13): ~40 + the B accumulators."""
    return 40 + spec.batch


def fits(part: str, hidden_size: int, batch: int, keep: int, dtype: str, arch: str, *, coarse: tuple = (),
         registers_of=None) -> PersistentTrainSpec | None:
    spec = spec_for_arch(part, hidden_size, batch, keep, dtype, arch, coarse=coarse)
    if spec.smem_bytes() + RESERVED_SMEM > ARCH_LIMITS[arch]["smem_block"]:
        return None
    regs = (registers_of or estimated_registers)(spec)
    return spec if coresidency_problem(spec, arch, regs) is None else None


def max_hidden_size(arch: str, *, batch: int = 20, keep_ratio: float = 0.35, dtype: str = "bfloat16",
                    step: int = 4, coarse: tuple = ()) -> dict:
    """The largest hidden size (multiple of ``step``) whose forward and backward kernels both
    fit on chip: ``{"fwd": H, "bwd": H, "both": H}`` (linear scan down from an upper bound)."""
    out = {}
    for part in ("fwd", "bwd"):
        best = 0
        for h in range(step, 8192, step):
            k = max(1, round(keep_ratio * h))
            if fits(part, h, batch, k, dtype, arch, coarse=coarse if part == "bwd" else ()):
                best = h
        out[part] = best
    out["both"] = min(out["fwd"], out["bwd"])
    return out


# -- TIR ------------------------------------------------------------------------------------

def _sig(T, x):
    return T.float32(1.0) / (T.float32(1.0) + T.exp(-x))


def make_kernel(spec: PersistentTrainSpec, *, twin: bool = False):
    return (_make_fwd if spec.part == "fwd" else _make_bwd)(spec, twin)


def _make_fwd(spec: PersistentTrainSpec, twin: bool):
    from tvm.script import tirx as T

    barrier = grid_barrier()

    H, B, K, dt, G = spec.hidden_size, spec.batch, spec.keep, spec.dtype, spec.grid
    U, R4, FS, NT = spec.units, spec.rows, spec.split, spec.threads
    SB, L = spec.slots * B, spec.h_len
    f32 = "float32"
    BV = max(v for v in (1, 2, 4) if B % v == 0)  # batch columns per wide shared load of h
    NI, NH, NW, NC = _cdiv(K, NT), _cdiv(K * B, NT), _cdiv(R4 * H, NT), _cdiv(U * B, NT)
    NK = _cdiv(K, FS)

    @T.macro
    def load_w(W, bx, tx, w_s):
        # the CTA's 4U rows, transposed: w_s[col * 4U + row]
        for i in range(NW):
            if i * NT + tx < R4 * H:
                w_s[((i * NT + tx) % H) * R4 + (i * NT + tx) // H] = W[bx * R4 + (i * NT + tx) // H, (i * NT + tx) % H]

    @T.macro
    def fetch(idx, Hs, t, tx, a, idx_s, h_s, phase):
        if phase == 0:
            for i in range(NI):
                if i * NT + tx < K:
                    idx_s[i * NT + tx] = idx[t, i * NT + tx]
        else:
            # a * h_{t-1}[J_t], position-major (k*B + b); padding positions (index >= H) are 0
            for i in range(NH):
                if i * NT + tx < K * B:
                    h_s[i * NT + tx] = T.if_then_else(
                        idx_s[(i * NT + tx) // B] < H,
                        a * T.Cast(f32, Hs[t, T.min(idx_s[(i * NT + tx) // B], H - 1) * B + (i * NT + tx) % B]),
                        T.float32(0))

    @T.macro
    def dot(tx, w_s, idx_s, h_s, part_s, acc):
        # thread tx = s*4U + r: row r over kept positions s, s + FS, ...
        for b in T.unroll(B):
            acc[b] = T.float32(0)
        for jj in range(NK):
            if jj * FS + tx // R4 < K:
                for bo in T.unroll(B // BV):
                    for b in T.vectorized(BV):
                        acc[bo * BV + b] = acc[bo * BV + b] + T.Cast(
                            f32, w_s[T.min(idx_s[jj * FS + tx // R4], H - 1) * R4 + tx % R4]) * h_s[
                            (jj * FS + tx // R4) * B + bo * BV + b]
        for b in T.unroll(B):
            part_s[tx * B + b] = acc[b]

    @T.macro
    def cell(Xg, Hs, Cs, Ac, bx, tx, t, part_s, gs):
        # thread i*NT + tx < U*B owns (unit bx*U + u, batch b)
        for i in range(NC):
            if i * NT + tx < U * B:
                if bx * U + (i * NT + tx) // B < H:
                    for g in T.unroll(4):
                        gs[g] = T.Cast(f32, Xg[t, (i * NT + tx) % B, g * H + bx * U + (i * NT + tx) // B])
                        for s in T.unroll(FS):
                            gs[g] = gs[g] + part_s[(s * R4 + ((i * NT + tx) // B) * 4 + g) * B + (i * NT + tx) % B]
                    gs[0] = _sig(T, gs[0])
                    gs[1] = _sig(T, gs[1])
                    gs[2] = T.tanh(gs[2])
                    gs[3] = _sig(T, gs[3])
                    for g in T.unroll(4):
                        Ac[t, ((bx * U + (i * NT + tx) // B) * 4 + g) * B + (i * NT + tx) % B] = gs[g]
                    Cs[t + 1, bx * U * B + i * NT + tx] = gs[1] * Cs[t, bx * U * B + i * NT + tx] + gs[0] * gs[2]
                    Hs[t + 1, bx * U * B + i * NT + tx] = T.Cast(dt, gs[3] * T.tanh(Cs[t + 1, bx * U * B + i * NT + tx]))

    def entry(body, symbol):
        """The PrimFunc around ``body`` (the kernel's or the twin's)."""
        @T.prim_func
        def fwd(xg_h: T.handle, idx_h: T.handle, w_h: T.handle, hs_h: T.handle, cs_h: T.handle, ac_h: T.handle,
                bar_h: T.handle, a: T.float32):
            T.func_attr({"global_symbol": symbol, "tirx.noalias": True})
            Tn = T.int32()
            Xg = T.match_buffer(xg_h, (Tn, B, 4 * H), dt)
            idx = T.match_buffer(idx_h, (Tn, K), "int32")
            W = T.match_buffer(w_h, (G * R4, H), dt)
            Hs = T.match_buffer(hs_h, (Tn + 1, L), dt)
            Cs = T.match_buffer(cs_h, (Tn + 1, SB), f32)
            Ac = T.match_buffer(ac_h, (Tn, 4 * SB), f32)
            bar = T.match_buffer(bar_h, (1,), "int32")
            body(Xg, idx, W, Hs, Cs, Ac, bar, a, Tn)

        return fwd

    @T.macro
    def cuda_body(Xg, idx, W, Hs, Cs, Ac, bar, a, Tn):
        bx = T.launch_thread("blockIdx.x", G)
        tx = T.launch_thread("threadIdx.x", NT)
        w_s = T.alloc_buffer((R4 * H,), dt, scope="shared.dyn")
        idx_s = T.alloc_buffer((K,), "int32", scope="shared.dyn")
        h_s = T.alloc_buffer((K * B,), f32, scope="shared.dyn")
        part_s = T.alloc_buffer((NT * B,), f32, scope="shared.dyn")
        acc = T.alloc_buffer((B,), f32, scope="local")
        gs = T.alloc_buffer((4,), f32, scope="local")
        seen = T.alloc_buffer((1,), "int32", scope="local")
        load_w(W, bx, tx, w_s)
        for t in range(Tn):
            fetch(idx, Hs, t, tx, a, idx_s, h_s, 0)
            T.tvm_storage_sync("shared")
            fetch(idx, Hs, t, tx, a, idx_s, h_s, 1)
            T.tvm_storage_sync("shared")
            dot(tx, w_s, idx_s, h_s, part_s, acc)
            T.tvm_storage_sync("shared")
            cell(Xg, Hs, Cs, Ac, bx, tx, t, part_s, gs)
            # grid barrier: h_t of every CTA is in Hs[t + 1] before anyone gathers it
            barrier(bar, seen, tx, t, G)

    @T.macro
    def twin_body(Xg, idx, W, Hs, Cs, Ac, bar, a, Tn):
        w_s = T.alloc_buffer((R4 * H,), dt)
        idx_s = T.alloc_buffer((K,), "int32")
        h_s = T.alloc_buffer((K * B,), f32)
        part_s = T.alloc_buffer((NT * B,), f32)
        acc = T.alloc_buffer((B,), f32)
        gs = T.alloc_buffer((4,), f32)
        for t in range(Tn):
            for bx in range(G):
                for tx in range(NT):
                    load_w(W, bx, tx, w_s)
                for tx in range(NT):
                    fetch(idx, Hs, t, tx, a, idx_s, h_s, 0)
                for tx in range(NT):  # cta_sync
                    fetch(idx, Hs, t, tx, a, idx_s, h_s, 1)
                for tx in range(NT):  # cta_sync
                    dot(tx, w_s, idx_s, h_s, part_s, acc)
                for tx in range(NT):  # cta_sync
                    cell(Xg, Hs, Cs, Ac, bx, tx, t, part_s, gs)
            bar[0] = bar[0] + G  # grid barrier: step t+1 starts after every CTA's step t

    return entry(twin_body, spec.name + "_twin") if twin else entry(cuda_body, spec.name)


def _make_bwd(spec: PersistentTrainSpec, twin: bool):
    from tvm.script import tirx as T

    barrier = grid_barrier()

    H, B, K, dt, G = spec.hidden_size, spec.batch, spec.keep, spec.dtype, spec.grid
    U, BS, NT = spec.units, spec.split, spec.threads
    SB = spec.slots * B
    H4 = 4 * H
    f32 = "float32"
    coarse = bool(spec.coarse)
    CP, CR, CS = spec.coarse if coarse else (H4, 1, 0)
    NSL = max(spec.n_slices, 1)
    BV = max(v for v in (1, 2, 4) if B % v == 0)
    NE, NI, NQ, NZ = _cdiv(U * B, NT), _cdiv(K, NT), _cdiv(NSL, NT), _cdiv(4 * U * B, NT)
    NR = _cdiv(H4, BS)
    UM = _up(U, 4)  # (a 1-element shared buffer breaks TVM's shared-memory merge)
    VW = max(v for v in (8, 4, 2, 1) if H4 % v == 0 and v * _BYTES[dt] <= 16)
    NW = _cdiv(U * H4 // VW, NT)

    @T.macro
    def load_w(Wb, bx, tx, wb_s):
        # the CTA's U columns of W_hh (rows of Wb = W_hh^T), unit-major, 16-byte copies
        for i in range(NW):
            if i * NT + tx < U * H4 // VW:
                for v in T.vectorized(VW):
                    wb_s[(i * NT + tx) * VW + v] = Wb[bx * U + (i * NT + tx) // (H4 // VW),
                                                     (i * NT + tx) % (H4 // VW) * VW + v]

    @T.macro
    def elem(dY, Ac, Cs, DH, DC, Dn, bx, tx, t, mem_s, dl_s, e):
        if tx < U:
            mem_s[tx] = 0
        for i in range(NE):
            if i * NT + tx < U * B:
                if bx * U + (i * NT + tx) // B < H:
                    # e: 0 dh, 1 i, 2 f, 3 g, 4 o, 5 tanh(c_t), 6 dc, 7 dnet
                    e[0] = dY[t, bx * U * B + i * NT + tx] + DH[bx * U * B + i * NT + tx]
                    for g in T.unroll(4):
                        e[1 + g] = Ac[t, ((bx * U + (i * NT + tx) // B) * 4 + g) * B + (i * NT + tx) % B]
                    e[5] = T.tanh(Cs[t + 1, bx * U * B + i * NT + tx])
                    e[6] = DC[bx * U * B + i * NT + tx] + e[0] * e[4] * (T.float32(1) - e[5] * e[5])
                    for g in T.unroll(4):
                        if g == 0:
                            e[7] = e[6] * e[3] * e[1] * (T.float32(1) - e[1])
                        elif g == 1:
                            e[7] = e[6] * Cs[t, bx * U * B + i * NT + tx] * e[2] * (T.float32(1) - e[2])
                        elif g == 2:
                            e[7] = e[6] * e[1] * (T.float32(1) - e[3] * e[3])
                        else:
                            e[7] = e[0] * e[5] * e[4] * (T.float32(1) - e[4])
                        Dn[t, (g * H + bx * U + (i * NT + tx) // B) * B + (i * NT + tx) % B] = T.Cast(dt, e[7])
                        if coarse:
                            # the norm of the stored (rounded) value: what the product uses
                            dl_s[(((i * NT + tx) // B) * 4 + g) * B + (i * NT + tx) % B] = T.Cast(f32, T.Cast(dt, e[7]))
                    DC[bx * U * B + i * NT + tx] = e[6] * e[2]
                    DH[bx * U * B + i * NT + tx] = T.float32(0)

    @T.macro
    def norms(Sq, bx, tx, t, dl_s, e):
        # squared L2 norm over the batch of each own gate-order column g*H + j
        for i in range(_cdiv(4 * U, NT)):
            if i * NT + tx < 4 * U:
                if bx * U + (i * NT + tx) // 4 < H:
                    e[0] = T.float32(0)
                    for b in range(B):
                        e[0] = e[0] + dl_s[(i * NT + tx) * B + b] * dl_s[(i * NT + tx) * B + b]
                    Sq[t, ((i * NT + tx) % 4) * H + bx * U + (i * NT + tx) // 4] = e[0]

    @T.macro
    def members(idx, bx, tx, t, mem_s):
        for i in range(NI):
            if i * NT + tx < K:
                if idx[t, i * NT + tx] >= bx * U and idx[t, i * NT + tx] < T.min(bx * U + U, H):
                    mem_s[idx[t, i * NT + tx] - bx * U] = 1

    @T.macro
    def scores(Sq, tx, t, sc_s, e):
        # every CTA: the same float32 sums in the same order (bit-identical kept sets)
        for i in range(NQ):
            if i * NT + tx < NSL:
                e[0] = T.float32(0)
                for p in range(CP):
                    e[0] = e[0] + Sq[t, (i * NT + tx) * CP + p]
                sc_s[i * NT + tx] = T.if_then_else(T.isfinite(e[0]), e[0], T.float32("inf"))

    @T.macro
    def select(Kp, bx, tx, t, sc_s, kp_s, rk):
        # rank of slice s in its region by (score, index); the S*r//R smallest are dropped
        for i in range(NQ):
            # (no loop inside a branch here: TVM's sync planner cannot place syncs there)
            rk[0] = 0
            for q in range(CR):
                rk[0] = rk[0] + T.Cast("int32", i * NT + tx < NSL and ((i * NT + tx) // CR) * CR + q < NSL and (
                    sc_s[T.min(((i * NT + tx) // CR) * CR + q, NSL - 1)] < sc_s[T.min(i * NT + tx, NSL - 1)] or (
                        sc_s[T.min(((i * NT + tx) // CR) * CR + q, NSL - 1)] == sc_s[T.min(i * NT + tx, NSL - 1)]
                        and q < (i * NT + tx) % CR)))
            if i * NT + tx < NSL:
                rk[1] = T.if_then_else(rk[0] < (CS * T.min(CR, NSL - ((i * NT + tx) // CR) * CR)) // CR, 0, 1)
                kp_s[i * NT + tx] = rk[1]
                if bx == 0:
                    Kp[t, i * NT + tx] = rk[1]

    @T.macro
    def zero_dropped(Dn, bx, tx, t, kp_s, rk):
        # own columns of dropped slices: nobody else reads them (they skip dropped rows)
        for i in range(NZ):
            if i * NT + tx < 4 * U * B:
                if bx * U + (i * NT + tx) // (4 * B) < H:
                    rk[0] = kp_s[(((i * NT + tx) // B) % 4 * H + bx * U + (i * NT + tx) // (4 * B)) // CP]
                    if rk[0] == 0:
                        Dn[t, ((((i * NT + tx) // B) % 4) * H + bx * U + (i * NT + tx) // (4 * B)) * B
                           + (i * NT + tx) % B] = T.Cast(dt, T.float32(0))

    def kflag(kp_s, r):  # kept flag of row r's slice (always 1 without selection)
        return kp_s[r // CP] if coarse else T.int32(1)

    @T.macro
    def dot(Dn, t, tx, wb_s, mem_s, kp_s, part_s, acc, rk):
        # warp-per-unit: thread tx = u*BS + s sums rows s, s + BS, ... of dNet_t . W_hh[:, u]
        for b in T.unroll(B):
            acc[b] = T.float32(0)
        rk[0] = mem_s[tx // BS]  # (shared loads go through a register before a branch)
        if rk[0] == 1:
            for jj in range(NR):
                if jj * BS + tx % BS < H4:
                    rk[1] = kflag(kp_s, jj * BS + tx % BS)
                    if rk[1] == 1:
                        for bo in T.unroll(B // BV):
                            for b in T.vectorized(BV):
                                acc[bo * BV + b] = acc[bo * BV + b] + T.Cast(
                                    f32, wb_s[(tx // BS) * H4 + jj * BS + tx % BS]) * T.Cast(
                                    f32, Dn[t, (jj * BS + tx % BS) * B + bo * BV + b])
        for b in T.unroll(B):
            part_s[tx * B + b] = acc[b]

    @T.macro
    def reduce(DH, bx, tx, a, mem_s, part_s, e, rk):
        for i in range(NE):
            if i * NT + tx < U * B:
                if bx * U + (i * NT + tx) // B < H:
                    rk[0] = mem_s[(i * NT + tx) // B]
                    if rk[0] == 1:
                        e[0] = T.float32(0)
                        for s in range(BS):
                            e[0] = e[0] + part_s[(((i * NT + tx) // B) * BS + s) * B + (i * NT + tx) % B]
                        DH[bx * U * B + i * NT + tx] = a * e[0]

    def entry(body, symbol, selection):
        """The PrimFunc around ``body`` (the kernel's or the twin's); ``selection``: with the
        coarse selection's buffers ``Sq`` and ``Kp`` (the twin always takes them)."""
        if selection:
            @T.prim_func
            def bwd_sel(dy_h: T.handle, ac_h: T.handle, cs_h: T.handle, idx_h: T.handle, wb_h: T.handle,
                        dh_h: T.handle, dc_h: T.handle, dn_h: T.handle, bar_h: T.handle, sq_h: T.handle,
                        kp_h: T.handle, a: T.float32):
                T.func_attr({"global_symbol": symbol, "tirx.noalias": True})
                Tn = T.int32()
                dY = T.match_buffer(dy_h, (Tn, SB), f32)
                Ac = T.match_buffer(ac_h, (Tn, 4 * SB), f32)
                Cs = T.match_buffer(cs_h, (Tn + 1, SB), f32)
                idx = T.match_buffer(idx_h, (Tn, K), "int32")
                Wb = T.match_buffer(wb_h, (G * U, H4), dt)
                DH = T.match_buffer(dh_h, (SB,), f32)
                DC = T.match_buffer(dc_h, (SB,), f32)
                Dn = T.match_buffer(dn_h, (Tn, H4 * B), dt)
                bar = T.match_buffer(bar_h, (1,), "int32")
                Sq = T.match_buffer(sq_h, (Tn, H4), f32)
                Kp = T.match_buffer(kp_h, (Tn, NSL), "int32")
                body(dY, Ac, Cs, idx, Wb, DH, DC, Dn, bar, Sq, Kp, a, Tn)

            return bwd_sel

        @T.prim_func
        def bwd(dy_h: T.handle, ac_h: T.handle, cs_h: T.handle, idx_h: T.handle, wb_h: T.handle,
                dh_h: T.handle, dc_h: T.handle, dn_h: T.handle, bar_h: T.handle, a: T.float32):
            T.func_attr({"global_symbol": symbol, "tirx.noalias": True})
            Tn = T.int32()
            dY = T.match_buffer(dy_h, (Tn, SB), f32)
            Ac = T.match_buffer(ac_h, (Tn, 4 * SB), f32)
            Cs = T.match_buffer(cs_h, (Tn + 1, SB), f32)
            idx = T.match_buffer(idx_h, (Tn, K), "int32")
            Wb = T.match_buffer(wb_h, (G * U, H4), dt)
            DH = T.match_buffer(dh_h, (SB,), f32)
            DC = T.match_buffer(dc_h, (SB,), f32)
            Dn = T.match_buffer(dn_h, (Tn, H4 * B), dt)
            bar = T.match_buffer(bar_h, (1,), "int32")
            body(dY, Ac, Cs, idx, Wb, DH, DC, Dn, bar, None, None, a, Tn)  # no selection: Sq/Kp unused

        return bwd

    @T.macro
    def cuda_body(dY, Ac, Cs, idx, Wb, DH, DC, Dn, bar, Sq, Kp, a, Tn):
        bx = T.launch_thread("blockIdx.x", G)
        tx = T.launch_thread("threadIdx.x", NT)
        wb_s = T.alloc_buffer((U * H4,), dt, scope="shared.dyn")
        mem_s = T.alloc_buffer((UM,), "int32", scope="shared.dyn")
        part_s = T.alloc_buffer((NT * B,), f32, scope="shared.dyn")
        if coarse:
            dl_s = T.alloc_buffer((4 * U * B,), f32, scope="shared.dyn")
            sc_s = T.alloc_buffer((NSL,), f32, scope="shared.dyn")
            kp_s = T.alloc_buffer((NSL,), "int32", scope="shared.dyn")
        else:
            dl_s = part_s  # elem's scratch for dNet: the partial sums' buffer (used after the barrier)
            kp_s = mem_s  # not read: every slice is kept (kflag)
        acc = T.alloc_buffer((B,), f32, scope="local")
        e = T.alloc_buffer((8,), f32, scope="local")
        rk = T.alloc_buffer((2,), "int32", scope="local")
        seen = T.alloc_buffer((1,), "int32", scope="local")
        tl = T.alloc_buffer((1,), "int32", scope="local")
        load_w(Wb, bx, tx, wb_s)
        for tt in range(Tn):
            tl[0] = Tn - 1 - tt  # (a register: Tn-dependent index math must not become a kernel argument)
            elem(dY, Ac, Cs, DH, DC, Dn, bx, tx, tl[0], mem_s, dl_s, e)
            if coarse:
                T.tvm_storage_sync("shared")
                norms(Sq, bx, tx, tl[0], dl_s, e)
            # grid barrier: dNet_t (and its column norms) from every CTA
            barrier(bar, seen, tx, tt, G)
            members(idx, bx, tx, tl[0], mem_s)
            if coarse:
                scores(Sq, tx, tl[0], sc_s, e)
                T.tvm_storage_sync("shared")
                select(Kp, bx, tx, tl[0], sc_s, kp_s, rk)
                T.tvm_storage_sync("shared")
                zero_dropped(Dn, bx, tx, tl[0], kp_s, rk)
            else:
                T.tvm_storage_sync("shared")
            dot(Dn, tl[0], tx, wb_s, mem_s, kp_s, part_s, acc, rk)
            T.tvm_storage_sync("shared")
            reduce(DH, bx, tx, a, mem_s, part_s, e, rk)
            T.tvm_storage_sync("shared")

    @T.macro
    def twin_body(dY, Ac, Cs, idx, Wb, DH, DC, Dn, bar, Sq, Kp, a, Tn):
        wb_s = T.alloc_buffer((U * H4,), dt)
        mem_s = T.alloc_buffer((UM,), "int32")
        part_s = T.alloc_buffer((NT * B,), f32)
        dl_s = T.alloc_buffer((4 * U * B,), f32)
        sc_s = T.alloc_buffer((NSL,), f32)
        kp_s = T.alloc_buffer((NSL,), "int32")
        acc = T.alloc_buffer((B,), f32)
        e = T.alloc_buffer((8,), f32)
        rk = T.alloc_buffer((2,), "int32")
        for tt in range(Tn):
            for bx in range(G):
                for tx in range(NT):
                    elem(dY, Ac, Cs, DH, DC, Dn, bx, tx, Tn - 1 - tt, mem_s, dl_s, e)
                if coarse:
                    for tx in range(NT):  # cta_sync
                        norms(Sq, bx, tx, Tn - 1 - tt, dl_s, e)
            bar[0] = bar[0] + G  # grid barrier: dNet_t (and its column norms) from every CTA
            # (a CTA zeroes only dropped columns it owns, which no dot product reads, so the
            # serial order of the CTAs below is one of the orders the GPU may run)
            for bx in range(G):
                for tx in range(NT):
                    load_w(Wb, bx, tx, wb_s)
                for u in range(U):  # elem's clearing of this CTA's mem_s (before the barrier)
                    mem_s[u] = 0
                for tx in range(NT):
                    members(idx, bx, tx, Tn - 1 - tt, mem_s)
                if coarse:
                    for tx in range(NT):
                        scores(Sq, tx, Tn - 1 - tt, sc_s, e)
                    for tx in range(NT):  # cta_sync
                        select(Kp, bx, tx, Tn - 1 - tt, sc_s, kp_s, rk)
                    for tx in range(NT):  # cta_sync
                        zero_dropped(Dn, bx, tx, Tn - 1 - tt, kp_s, rk)
                for tx in range(NT):  # cta_sync
                    dot(Dn, Tn - 1 - tt, tx, wb_s, mem_s, kp_s, part_s, acc, rk)
                for tx in range(NT):  # cta_sync
                    reduce(DH, bx, tx, a, mem_s, part_s, e, rk)

    if twin:
        return entry(twin_body, spec.name + "_twin", True)
    return entry(cuda_body, spec.name, coarse)


def build_twin(spec: PersistentTrainSpec):
    """The CPU twin compiled for LLVM (call ``mod[spec.name + "_twin"](...)``; the backward
    twin always takes ``Sq`` and ``Kp``, dummies ``(T, 1)`` without coarse selection)."""
    import tvm

    from .toolchain import import_tvm

    import_tvm()
    return tvm.compile(tvm.IRModule({spec.name + "_twin": make_kernel(spec, twin=True)}), target="llvm")


def cuda_source(spec: PersistentTrainSpec, arch: str) -> str:
    from .toolchain import import_tvm

    tvm = import_tvm()
    lib = tvm.compile(tvm.IRModule({spec.name: make_kernel(spec)}),
                      target=tvm.target.Target({"kind": "cuda", "arch": arch}))
    return lib.mod.imports[0].inspect_source("cuda")


@dataclass(frozen=True)
class PersistentTrainRequest:
    """What a bundle asks for: both kernels of one layer shape, built per arch."""

    hidden_size: int
    batch: int
    keep: int  # kept units of h_{t-1} per step (H without RH dropout)
    dtype: str
    coarse: tuple = ()
    sms: int | None = None  # SMs of the target part (the grid); None: the arch's reference part

    def specs(self, arch: str) -> list[PersistentTrainSpec]:
        return [spec_for_arch("fwd", self.hidden_size, self.batch, self.keep, self.dtype, arch, sms=self.sms),
                spec_for_arch("bwd", self.hidden_size, self.batch, self.keep, self.dtype, arch, coarse=self.coarse,
                              sms=self.sms)]


def train_request(hidden_size: int, batch: int, sd, gs, dtype: str):
    """The persistent training loops one LSTM needs: the kept count of its recurrent dropout
    ``sd`` (all ``hidden_size`` units without) and the coarse selection of ``gs``; None when
    ``gs`` is fine or meProp selection, which the loops do not fuse."""
    from rnn_sparsify.config import kept_count

    if gs is not None and gs.mode != "coarse":
        return None
    keep = kept_count(hidden_size, sd.p_recurrent) if sd is not None and sd.p_recurrent > 0 else hidden_size
    coarse = (gs.P, gs.R, gs.S) if gs is not None else ()
    return PersistentTrainRequest(hidden_size, batch, keep, dtype, coarse)


__all__ = ["KINDS", "KIND_BWD", "KIND_FWD", "PersistentTrainRequest", "PersistentTrainSpec", "build_twin",
           "coresidency_problem", "cuda_source", "estimated_registers", "fits", "make_kernel", "max_hidden_size",
           "spec_for_arch", "train_request"]
