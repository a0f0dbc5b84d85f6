"""TVM (LLVM target) CPU kernels for one sparse LSTM layer over a whole sequence.

Build-time only (needs ``apache-tvm``); the run-time side is
:mod:`rnn_sparsify.kernels.cpu_backend`, which loads the exported ``.so`` with ``tvm_ffi``
alone. The algorithm follows the structured-dropout prototype in ``shared/cpu-notes``
(reference material): see ``docs/cpu_kernels.md`` for what each technique buys.

Layouts (float32, row-major; ``U = 16`` units per block):

* hidden size ``H`` padded to ``Hp`` (multiple of U); gate columns ``G = 4 * Hp`` interleaved
  by unit block: column ``ub*4U + gate*U + u`` holds gate ``gate`` (i, f, g, o) of unit
  ``ub*U + u``. One 4U-column block holds the four gates of 16 units, so the task that owns
  it finishes the cell update without a barrier.
* weights stored transposed, ``W^T`` of shape ``(n + 1, G)`` for an ``n``-wide input: the kept
  units of a step are whole contiguous rows; row ``n`` is all zeros (the *dummy row*): kept
  index lists are padded to a multiple of the kernels' row tile with ``n``.
* ``idx (T, K)`` int32: kept units per step (one mask per step, shared by the batch), padded
  with ``n``; ``a`` the inverted-dropout scale.
* the batch is padded to ``Bp`` (multiple of the row tile ``RT``) with zero rows.

Kernels (each ``make_*`` returns a PrimFunc; ``T`` is symbolic, every other size static):

==========  ================================================================================
pack        ``Pk[t, b/RT, k, b%RT] = a * X[t, b, idx[t, k]]`` (0 at the dummy index)
in_proj     ``P[t] = bias + Pk[t] @ W^T[idx[t]]`` for all t at once (hoisted input GEMM;
            the gathered panel of each task is copied to a contiguous buffer first)
fwd_loop    the recurrence: per step the recurrent GEMM over the kept rows of W_hh^T, the
            fused cell update, and packing of ``a * h_t[:, J_{t+1}]`` for the next step
bwd_loop    the backward recurrence: element-wise gate gradients ``dNet_t``, then
            ``dh_{t-1}[:, J_t] = a * dNet_t @ W_hh^T[J_t]^T`` (dot products with kept rows)
bwd_elem    one step of bwd_loop's element-wise part (for gate-gradient selection between
bwd_dh      the two parts, done by the caller) and one step of its dot products
wgrad       ``dW^T[idx[t]] += Pk_t^T @ dNet_t`` for all t, slab-stationary (one task per
            column slab of dW^T, which stays in cache over the T loop; no atomics), each
            slab then written transposed into ``dW`` (4H, n), the parameter's layout
to_wt       ``W`` (4H, n) -> ``W^T`` (n + 1, G), the kernel layout (once per weight version)
dx          ``dX_t[:, idx[t]] = a * dNet_t @ W^T[idx[t]]^T`` for all t, zero elsewhere
==========  ================================================================================
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

U = 16  # units per block; a block holds 4*U gate columns

GENERATOR_VERSION = "4"  # bump when the generated code changes for the same parameters


@dataclass(frozen=True)
class CpuTiles:
    """Vector width and register tiles for one ISA class (see :data:`ISA_TILES`)."""

    V: int  # floats per vector register
    CV: int  # columns per register tile of the axpy GEMMs (in_proj, fwd_loop); divides 4*U
    RT: int  # batch rows per register tile (every kernel); the batch is padded to a multiple
    KT: int  # kept rows per register tile of the dot-product kernels (bwd_dh, dx)
    KR: int  # kept rows per register tile of wgrad
    CW: int  # columns of a wgrad slab; divides 4*U


ISA_TILES = {
    # 32 zmm: in_proj/fwd 5x64 (20 acc), dots 5x4 (20 acc), wgrad 4x64 (16 acc)
    "avx512": CpuTiles(V=16, CV=64, RT=5, KT=4, KR=4, CW=64),
    # 16 ymm: 5x16 (10 acc), 5x2 (10 acc), 5x16 (10 acc): the prototype's tiles
    "avx2": CpuTiles(V=8, CV=16, RT=5, KT=2, KR=5, CW=16),
    # SSE / NEON / anything else: 128-bit vectors
    "generic": CpuTiles(V=4, CV=8, RT=4, KT=2, KR=4, CW=8),
}


@dataclass(frozen=True)
class CpuLayerSpec:
    """Static parameters of the kernels of one layer/direction (``T`` stays symbolic)."""

    input_size: int  # I (real)
    hidden_size: int  # H (real)
    batch: int  # Bp (padded to a multiple of RT)
    k_in: int  # kept input rows per step, padded to a multiple of the tiles
    k_rec: int  # kept recurrent rows per step, padded
    isa: str  # key of ISA_TILES
    mcpu: str  # LLVM -mcpu for the build ("" = generic for the ISA)
    x_width: int = 0  # row width of the X buffer given to pack (>= input_size; 0 = input_size)
    coarse: tuple = ()  # (P, R, S) of coarse gate-gradient sparsity: adds bwd_coarse

    @property
    def tiles(self) -> CpuTiles:
        return ISA_TILES[self.isa]

    @property
    def Hp(self) -> int:
        return -(-self.hidden_size // U) * U

    @property
    def G(self) -> int:
        return 4 * self.Hp

    @property
    def xw(self) -> int:
        return self.x_width or self.input_size

    def to_dict(self) -> dict:
        return {"generator": GENERATOR_VERSION, **asdict(self), "coarse": list(self.coarse)}  # as JSON reads it


def pad_kept(k: int, isa: str) -> int:
    """Kept count padded to a multiple of every kept-row tile of ``isa``."""
    t = ISA_TILES[isa]
    m = _lcm(t.KT, t.KR)
    return -(-k // m) * m


def pad_batch(b: int, isa: str) -> tuple[int, int]:
    """``(RT, Bp)``: the row tile used for a batch of ``b`` and the padded batch."""
    rt = min(ISA_TILES[isa].RT, b)
    return rt, -(-b // rt) * rt


def _lcm(a: int, b: int) -> int:
    import math

    return a * b // math.gcd(a, b)


# --------------------------------------------------------------------------------------
# element-wise helpers (vectorisable: no calls into libm)


def _exp(T, x):
    """exp for float32 vectors: Cephes-style range reduction + degree-6 polynomial (~1e-7)."""
    x = T.max(T.min(x, T.float32(88.0)), T.float32(-87.0))
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    r = x - n * T.float32(0.693359375) + n * T.float32(2.12194440e-4)
    y = (((((T.float32(1.9875691500e-4) * r + T.float32(1.3981999507e-3)) * r
            + T.float32(8.3334519073e-3)) * r + T.float32(4.1665795894e-2)) * r
          + T.float32(1.6666665459e-1)) * r + T.float32(5.0000001201e-1)) * r * r + r + T.float32(1.0)
    return y * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))


def _sigmoid(T, x):
    return T.float32(1.0) / (T.float32(1.0) + _exp(T, -x))


def _tanh(T, x):
    return T.float32(2.0) / (T.float32(1.0) + _exp(T, x * T.float32(-2.0))) - T.float32(1.0)


# --------------------------------------------------------------------------------------
# generators


def make_pack(spec: CpuLayerSpec, n: int, K: int, X_width: int):
    """``Pk[t, io, k, ii] = a * X[t, io*RT+ii, idx[t, k]]`` (0 where ``idx >= n``)."""
    from tvm.script import tirx as T

    B = spec.batch
    RT = min(spec.tiles.RT, B)

    @T.prim_func
    def pack(x_h: T.handle, i_h: T.handle, a: T.float32, p_h: T.handle):
        T.func_attr({"global_symbol": "pack", "tirx.noalias": True})
        Tn = T.int32()
        X = T.match_buffer(x_h, (Tn, B, X_width), "float32")
        idx = T.match_buffer(i_h, (Tn, K), "int32")
        Pk = T.match_buffer(p_h, (Tn, B // RT, K, RT), "float32")
        for t in T.parallel(Tn):
            for io in range(B // RT):
                for kk in range(K):
                    for ii in T.unroll(RT):
                        Pk[t, io, kk, ii] = T.if_then_else(
                            idx[t, kk] < n, a * X[t, io * RT + ii, T.min(idx[t, kk], n - 1)], T.float32(0)
                        )

    return pack


def make_in_proj(spec: CpuLayerSpec, n: int, K: int):
    """``P[t, b, :] = bias + sum_k Pk[t, b, k] * W^T[idx[t, k], :]`` for all t (one call)."""
    from tvm.script import tirx as T

    B, G, tl = spec.batch, spec.G, spec.tiles
    RT, CV = min(tl.RT, B), tl.CV
    NCB = G // (4 * U)
    NGC = 4 * U // CV

    @T.prim_func
    def in_proj(p_h: T.handle, i_h: T.handle, w_h: T.handle, b_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "in_proj", "tirx.noalias": True})
        Tn = T.int32()
        Pk = T.match_buffer(p_h, (Tn, B // RT, K, RT), "float32")
        idx = T.match_buffer(i_h, (Tn, K), "int32")
        WT = T.match_buffer(w_h, (n + 1, G), "float32")
        bias = T.match_buffer(b_h, (G,), "float32")
        P = T.match_buffer(o_h, (Tn, B, G), "float32")
        for tc in T.parallel(Tn * NCB):
            acc = T.alloc_buffer((RT, CV), "float32", scope="local")
            Wp = T.alloc_buffer((NGC, K, CV), "float32", scope="local")
            for kk in range(K):  # gathered rows -> contiguous panel
                for gc in range(NGC):
                    for ji in T.vectorized(CV):
                        Wp[gc, kk, ji] = WT[idx[tc // NCB, kk], (tc % NCB) * (4 * U) + gc * CV + ji]
            for gc in range(NGC):
                for io in range(B // RT):
                    for ii in T.unroll(RT):
                        for ji in T.vectorized(CV):
                            acc[ii, ji] = T.float32(0)
                    for kk in range(K):
                        for ii in T.unroll(RT):
                            for ji in T.vectorized(CV):
                                acc[ii, ji] = acc[ii, ji] + Pk[tc // NCB, io, kk, ii] * Wp[gc, kk, ji]
                    for ii in T.unroll(RT):
                        for ji in T.vectorized(CV):
                            P[tc // NCB, io * RT + ii, (tc % NCB) * (4 * U) + gc * CV + ji] = (
                                bias[(tc % NCB) * (4 * U) + gc * CV + ji] + acc[ii, ji]
                            )

    return in_proj


def make_fwd_loop(spec: CpuLayerSpec):
    """The recurrence of one layer over all steps.

    ``Gt[t]`` holds the input projection + bias on entry and the activations i, f, g, o on
    exit; ``Hs``/``Cs`` (T+1, Bp, Hp) with ``Hs[0]``/``Cs[0]`` the initial state; ``Ak[t]`` =
    ``a * h_{t-1}[:, J_t]`` packed like ``pack`` (``Ak[0]`` is the caller's); the cell update
    of step t writes ``Ak[t+1]`` through ``inv[t+1]`` (position of a unit in ``J_{t+1}``, or -1).
    """
    from tvm.script import tirx as T

    B, Hp, G, K, H = spec.batch, spec.Hp, spec.G, spec.k_rec, spec.hidden_size
    tl = spec.tiles
    RT, CV = min(tl.RT, B), tl.CV
    NUB = Hp // U
    NGC = 4 * U // CV

    @T.prim_func
    def fwd_loop(g_h: T.handle, i_h: T.handle, inv_h: T.handle, w_h: T.handle, a: T.float32,
                 hs_h: T.handle, cs_h: T.handle, ak_h: T.handle):
        T.func_attr({"global_symbol": "fwd_loop", "tirx.noalias": True})
        Tn = T.int32()
        Gt = T.match_buffer(g_h, (Tn, B, G), "float32")
        idx = T.match_buffer(i_h, (Tn, K), "int32")
        inv = T.match_buffer(inv_h, (Tn, Hp), "int32")
        WT = T.match_buffer(w_h, (H + 1, G), "float32")
        Hs = T.match_buffer(hs_h, (Tn + 1, B, Hp), "float32")
        Cs = T.match_buffer(cs_h, (Tn + 1, B, Hp), "float32")
        Ak = T.match_buffer(ak_h, (Tn, B // RT, K, RT), "float32")
        for t in range(Tn):
            for ub in T.parallel(NUB):
                acc = T.alloc_buffer((RT, CV), "float32", scope="local")
                Wp = T.alloc_buffer((NGC, K, CV), "float32", scope="local")
                for kk in range(K):
                    for gc in range(NGC):
                        for ji in T.vectorized(CV):
                            Wp[gc, kk, ji] = WT[idx[t, kk], ub * (4 * U) + gc * CV + ji]
                for gc in range(NGC):
                    for io in range(B // RT):
                        for ii in T.unroll(RT):
                            for ji in T.vectorized(CV):
                                acc[ii, ji] = T.float32(0)
                        for kk in range(K):
                            for ii in T.unroll(RT):
                                for ji in T.vectorized(CV):
                                    acc[ii, ji] = acc[ii, ji] + Ak[t, io, kk, ii] * Wp[gc, kk, ji]
                        for ii in T.unroll(RT):
                            for ji in T.vectorized(CV):
                                Gt[t, io * RT + ii, ub * (4 * U) + gc * CV + ji] = (
                                    Gt[t, io * RT + ii, ub * (4 * U) + gc * CV + ji] + acc[ii, ji]
                                )
                # cell update (no let-bindings inside vectorized loops: they vectorise wrongly
                # in TVM 0.27; a small local buffer is promoted to registers instead)
                e = T.alloc_buffer((5, U), "float32", scope="local")
                for b in range(B):
                    for u in T.vectorized(U):
                        e[0, u] = _sigmoid(T, Gt[t, b, ub * (4 * U) + u])
                        e[1, u] = _sigmoid(T, Gt[t, b, ub * (4 * U) + U + u])
                        e[2, u] = _tanh(T, Gt[t, b, ub * (4 * U) + 2 * U + u])
                        e[3, u] = _sigmoid(T, Gt[t, b, ub * (4 * U) + 3 * U + u])
                        e[4, u] = e[1, u] * Cs[t, b, ub * U + u] + e[0, u] * e[2, u]
                        Cs[t + 1, b, ub * U + u] = e[4, u]
                        Hs[t + 1, b, ub * U + u] = e[3, u] * _tanh(T, e[4, u])
                        Gt[t, b, ub * (4 * U) + u] = e[0, u]
                        Gt[t, b, ub * (4 * U) + U + u] = e[1, u]
                        Gt[t, b, ub * (4 * U) + 2 * U + u] = e[2, u]
                        Gt[t, b, ub * (4 * U) + 3 * U + u] = e[3, u]
                if t + 1 < Tn:  # pack the kept units of h_t for step t+1
                    for u in range(U):
                        if inv[t + 1, ub * U + u] >= 0:
                            for io in range(B // RT):
                                for ii in T.unroll(RT):
                                    Ak[t + 1, io, inv[t + 1, ub * U + u], ii] = a * Hs[t + 1, io * RT + ii, ub * U + u]

    return fwd_loop


def _icol(c, H):
    """Interleaved column of gate-order column ``c`` (gate ``c // H``, unit ``c % H``)."""
    return (c % H) // U * (4 * U) + (c // H) * U + (c % H) % U


def _hsum(r, bi, ki, V):
    """Pairwise sum of the ``V`` lanes ``r[bi, ki, :]`` (a PrimExpr tree)."""
    terms = [r[bi, ki, v] for v in range(V)]
    while len(terms) > 1:
        terms = [terms[j] + terms[j + len(terms) // 2] for j in range(len(terms) // 2)]
    return terms[0]


def make_bwd(spec: CpuLayerSpec, part: str):
    """Backward recurrence for steps ``t1-1`` down to ``t0``.

    ``part``: ``"loop"`` (both halves of every step, fused), ``"elem"`` (only the
    element-wise half) or ``"dh"`` (only the dot products); the caller runs the halves one
    step at a time (``t0, t1 = t, t+1``) when it selects gate-gradient entries in between.
    ``DH`` (Bp, Hp) is the gradient reaching ``h_t`` through step t+1 (the caller's
    ``dh_T`` on entry; ``dh_{-1}`` = the initial state's gradient on exit, zero at dropped
    units); ``DC`` likewise for ``c``.
    """
    from tvm.script import tirx as T

    B, Hp, G, K, H = spec.batch, spec.Hp, spec.G, spec.k_rec, spec.hidden_size
    tl = spec.tiles
    RB, KT, V = min(tl.RT, B), tl.KT, tl.V
    NUB = Hp // U
    NKT = K // KT
    NV = G // V
    do_elem = part in ("loop", "elem", "coarse")
    do_dh = part in ("loop", "dh", "coarse")
    do_sel = part == "coarse"
    name = {"loop": "bwd_loop", "elem": "bwd_elem", "dh": "bwd_dh", "coarse": "bwd_coarse"}[part]
    # coarse selection (gate order: column c is gate c // H of unit c % H; slice s = columns
    # [s*P, s*P + P); region r = slices [r*R, r*R + R), the last one partial)
    CP, CR, CS = spec.coarse if do_sel else (4 * H, 1, 0)  # others: a (T, 1) dummy ``kept``
    NS = 4 * H // CP
    NR = -(-NS // CR)

    @T.prim_func
    def bwd(dy_h: T.handle, g_h: T.handle, cs_h: T.handle, i_h: T.handle, w_h: T.handle,
            a: T.float32, t0: T.int32, t1: T.int32, dh_h: T.handle, dc_h: T.handle, dn_h: T.handle,
            kp_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        Tn = T.int32()
        dY = T.match_buffer(dy_h, (Tn, B, Hp), "float32")
        Gt = T.match_buffer(g_h, (Tn, B, G), "float32")
        Cs = T.match_buffer(cs_h, (Tn + 1, B, Hp), "float32")
        idx = T.match_buffer(i_h, (Tn, K), "int32")
        WT = T.match_buffer(w_h, (H + 1, G), "float32")
        DH = T.match_buffer(dh_h, (B, Hp), "float32")
        DC = T.match_buffer(dc_h, (B, Hp), "float32")
        dNet = T.match_buffer(dn_h, (Tn, B, G), "float32")
        kept = T.match_buffer(kp_h, (Tn, NS), "int8")  # bwd_coarse: 1 where a slice is kept
        for tt in range(t0, t1):
            if do_elem:
                for ub in T.parallel(NUB):
                    e = T.alloc_buffer((7, U), "float32", scope="local")
                    for b in range(B):
                        for u in T.vectorized(U):
                            # e: 0 dh, 1 i, 2 f, 3 g, 4 o, 5 tanh(c_t), 6 dc
                            e[0, u] = dY[t0 + t1 - 1 - tt, b, ub * U + u] + DH[b, ub * U + u]
                            e[1, u] = Gt[t0 + t1 - 1 - tt, b, ub * (4 * U) + u]
                            e[2, u] = Gt[t0 + t1 - 1 - tt, b, ub * (4 * U) + U + u]
                            e[3, u] = Gt[t0 + t1 - 1 - tt, b, ub * (4 * U) + 2 * U + u]
                            e[4, u] = Gt[t0 + t1 - 1 - tt, b, ub * (4 * U) + 3 * U + u]
                            e[5, u] = _tanh(T, Cs[t0 + t1 - tt, b, ub * U + u])
                            e[6, u] = DC[b, ub * U + u] + e[0, u] * e[4, u] * (T.float32(1) - e[5, u] * e[5, u])
                            dNet[t0 + t1 - 1 - tt, b, ub * (4 * U) + u] = (
                                e[6, u] * e[3, u] * e[1, u] * (T.float32(1) - e[1, u]))
                            dNet[t0 + t1 - 1 - tt, b, ub * (4 * U) + U + u] = (
                                e[6, u] * Cs[t0 + t1 - 1 - tt, b, ub * U + u] * e[2, u] * (T.float32(1) - e[2, u]))
                            dNet[t0 + t1 - 1 - tt, b, ub * (4 * U) + 2 * U + u] = (
                                e[6, u] * e[1, u] * (T.float32(1) - e[3, u] * e[3, u]))
                            dNet[t0 + t1 - 1 - tt, b, ub * (4 * U) + 3 * U + u] = (
                                e[0, u] * e[5, u] * e[4, u] * (T.float32(1) - e[4, u]))
                            DC[b, ub * U + u] = e[6, u] * e[2, u]
                            DH[b, ub * U + u] = T.float32(0)
            if do_sel:
                for rg in T.parallel(NR):
                    sc = T.alloc_buffer((CR,), "float32", scope="local")
                    for j in range(CR):
                        sc[j] = T.float32(0)
                        if rg * CR + j < NS:
                            for b in range(B):
                                for pp in range(CP):
                                    sc[j] = sc[j] + dNet[t0 + t1 - 1 - tt, b, _icol(rg * CR * CP + j * CP + pp, H)] * dNet[
                                        t0 + t1 - 1 - tt, b, _icol(rg * CR * CP + j * CP + pp, H)]
                            sc[j] = T.if_then_else(T.isfinite(sc[j]), sc[j], T.float32("inf"))
                    rk = T.alloc_buffer((1,), "int32", scope="local")
                    for j in range(CR):
                        if rg * CR + j < NS:
                            # rank among the region's slices by (score, index): the S smallest
                            # are dropped (S * r // R of a last region of r < R slices)
                            kept[t0 + t1 - 1 - tt, rg * CR + j] = T.int8(1)
                            rk[0] = 0
                            for i in range(CR):
                                if rg * CR + i < NS:
                                    if sc[i] < sc[j] or (sc[i] == sc[j] and i < j):
                                        rk[0] = rk[0] + 1
                            if rk[0] < (CS * T.min(CR, NS - rg * CR)) // CR:
                                kept[t0 + t1 - 1 - tt, rg * CR + j] = T.int8(0)
                                for b in range(B):
                                    for pp in range(CP):
                                        dNet[t0 + t1 - 1 - tt, b, _icol(rg * CR * CP + j * CP + pp, H)] = T.float32(0)
            if do_dh:
                for kt in T.parallel(NKT):
                    # dh_{t-1}[:, J_t]: RB batch rows x KT kept rows of vector partial sums
                    r = T.alloc_buffer((RB, KT, V), "float32", scope="local")
                    for bo in range(B // RB):
                        for bi in T.unroll(RB):
                            for ki in T.unroll(KT):
                                for v in T.vectorized(V):
                                    r[bi, ki, v] = T.float32(0)
                        for jo in range(NV):
                            for bi in T.unroll(RB):
                                for ki in T.unroll(KT):
                                    for v in T.vectorized(V):
                                        r[bi, ki, v] = r[bi, ki, v] + (
                                            dNet[t0 + t1 - 1 - tt, bo * RB + bi, jo * V + v]
                                            * WT[idx[t0 + t1 - 1 - tt, kt * KT + ki], jo * V + v])
                        for bi in T.unroll(RB):
                            for ki in T.unroll(KT):
                                if idx[t0 + t1 - 1 - tt, kt * KT + ki] < H:
                                    DH[bo * RB + bi, idx[t0 + t1 - 1 - tt, kt * KT + ki]] = a * _hsum(r, bi, ki, V)

    return bwd


def make_wgrad(spec: CpuLayerSpec, n: int, K: int):
    """``dW^T[idx[t]] += Pk_t^T @ dNet_t`` over all t, written out as ``dW`` (4H, n).

    Slab-stationary: one task per ``CW``-column slab of the scratch ``dW^T`` ((n+1) x CW
    floats, zeroed first, stays in cache) loops over all T and touches only the kept rows of
    each step; no atomics. Padded kept positions carry zeros in ``Pk`` and land on the dummy
    row ``n``. The task then writes its slab, still in cache, transposed into the ``CW``
    rows of ``dW`` it holds (16 x 16 tiles; padding units skipped): no separate pass over
    the gradient.
    """
    from tvm.script import tirx as T

    B, G, H = spec.batch, spec.G, spec.hidden_size
    tl = spec.tiles
    RT, KR, CW = min(tl.RT, B), tl.KR, tl.CW
    NKB = -(-n // U)

    @T.prim_func
    def wgrad(p_h: T.handle, i_h: T.handle, dn_h: T.handle, o_h: T.handle, w_h: T.handle):
        T.func_attr({"global_symbol": "wgrad", "tirx.noalias": True})
        Tn = T.int32()
        Pk = T.match_buffer(p_h, (Tn, B // RT, K, RT), "float32")
        idx = T.match_buffer(i_h, (Tn, K), "int32")
        dNet = T.match_buffer(dn_h, (Tn, B, G), "float32")
        dWT = T.match_buffer(o_h, (n + 1, G), "float32")
        dW = T.match_buffer(w_h, (4 * H, n), "float32")
        for cs in T.parallel(G // CW):
            acc = T.alloc_buffer((KR, CW), "float32", scope="local")
            for r in range(n + 1):
                for v in T.vectorized(CW):
                    dWT[r, cs * CW + v] = T.float32(0)
            for t in range(Tn):
                for kr in range(K // KR):
                    for r in T.unroll(KR):
                        for v in T.vectorized(CW):
                            acc[r, v] = dWT[idx[t, kr * KR + r], cs * CW + v]
                    for io in range(B // RT):
                        for ii in range(RT):
                            for r in T.unroll(KR):
                                for v in T.vectorized(CW):
                                    acc[r, v] = acc[r, v] + Pk[t, io, kr * KR + r, ii] * dNet[t, io * RT + ii, cs * CW + v]
                    for r in T.unroll(KR):
                        for v in T.vectorized(CW):
                            dWT[idx[t, kr * KR + r], cs * CW + v] = acc[r, v]
            # column c of dW^T is gate (c % 4U) // U of unit (c // 4U) * U + c % U
            for kb in range(NKB):
                for v in range(CW):
                    if ((cs * CW + v) // (4 * U)) * U + (cs * CW + v) % U < H:
                        for kk in range(U):
                            if kb * U + kk < n:
                                dW[((cs * CW + v) % (4 * U)) // U * H + ((cs * CW + v) // (4 * U)) * U + (cs * CW + v) % U,
                                   kb * U + kk] = dWT[kb * U + kk, cs * CW + v]

    return wgrad


def make_dx(spec: CpuLayerSpec, n: int, K: int):
    """``dX[t, b, idx[t, k]] = a * dNet[t, b, :] . W^T[idx[t, k], :]``; zero elsewhere
    (``dX`` is (T, Bp, n): the real input width)."""
    from tvm.script import tirx as T

    B, G = spec.batch, spec.G
    tl = spec.tiles
    RB, KT, V = min(tl.RT, B), tl.KT, tl.V
    NKT = K // KT
    NV = G // V

    @T.prim_func
    def dx(dn_h: T.handle, i_h: T.handle, w_h: T.handle, a: T.float32, o_h: T.handle):
        T.func_attr({"global_symbol": "dx", "tirx.noalias": True})
        Tn = T.int32()
        dNet = T.match_buffer(dn_h, (Tn, B, G), "float32")
        idx = T.match_buffer(i_h, (Tn, K), "int32")
        WT = T.match_buffer(w_h, (n + 1, G), "float32")
        dX = T.match_buffer(o_h, (Tn, B, n), "float32")
        for t in T.parallel(Tn):
            for b in range(B):
                for i in range(n):
                    dX[t, b, i] = T.float32(0)
        for tk in T.parallel(Tn * NKT):
            r = T.alloc_buffer((RB, KT, V), "float32", scope="local")
            for bo in range(B // RB):
                for bi in T.unroll(RB):
                    for ki in T.unroll(KT):
                        for v in T.vectorized(V):
                            r[bi, ki, v] = T.float32(0)
                for jo in range(NV):
                    for bi in T.unroll(RB):
                        for ki in T.unroll(KT):
                            for v in T.vectorized(V):
                                r[bi, ki, v] = r[bi, ki, v] + (
                                    dNet[tk // NKT, bo * RB + bi, jo * V + v]
                                    * WT[idx[tk // NKT, (tk % NKT) * KT + ki], jo * V + v])
                for bi in T.unroll(RB):
                    for ki in T.unroll(KT):
                        if idx[tk // NKT, (tk % NKT) * KT + ki] < n:
                            dX[tk // NKT, bo * RB + bi, idx[tk // NKT, (tk % NKT) * KT + ki]] = a * _hsum(r, bi, ki, V)

    return dx


def make_to_wt(spec: CpuLayerSpec, n: int):
    """``nn.LSTM`` weight ``W`` (4H, n) -> ``W^T`` (n+1, G) interleaved, zero padding and
    dummy row. One task per (gate, 16-unit block): it reads its 16 rows of W as sequential
    streams and writes whole 16-float runs of W^T (1.6x faster than column-block order when
    W comes from memory, as it does after an optimizer step)."""
    from tvm.script import tirx as T

    H, Hp, G = spec.hidden_size, spec.Hp, spec.G
    NUB = Hp // U
    NKB = -(-n // U)

    @T.prim_func
    def to_wt(w_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "to_wt", "tirx.noalias": True})
        W = T.match_buffer(w_h, (4 * H, n), "float32")
        O = T.match_buffer(o_h, (n + 1, G), "float32")
        for gb in T.parallel(4 * NUB):  # gate g = gb // NUB of unit block ub = gb % NUB
            for kb in range(NKB):
                for kk in range(U):
                    if kb * U + kk < n:
                        for u in range(U):
                            O[kb * U + kk, (gb % NUB) * (4 * U) + (gb // NUB) * U + u] = T.if_then_else(
                                (gb % NUB) * U + u < H,
                                W[T.min((gb // NUB) * H + (gb % NUB) * U + u, 4 * H - 1), kb * U + kk], T.float32(0))
            if gb == 0:
                for c in range(G):
                    O[n, c] = T.float32(0)

    return to_wt


# --------------------------------------------------------------------------------------
# building


def llvm_target(isa: str, mcpu: str = ""):
    """The LLVM target for ``isa`` (``mcpu`` tunes for one CPU; "" = the ISA's baseline)."""
    import tvm

    base = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "generic": ""}[isa]
    cfg = {"kind": "llvm"}
    cpu = mcpu or base
    if cpu:
        cfg["mcpu"] = cpu
    return tvm.target.Target(cfg)


def layer_kernels(spec: CpuLayerSpec) -> dict:
    """Every PrimFunc one layer/direction call needs, by name."""
    I, H = spec.input_size, spec.hidden_size
    funcs = {
        "pack_in": make_pack(spec, I, spec.k_in, spec.xw),
        "in_proj": make_in_proj(spec, I, spec.k_in),
        "fwd_loop": make_fwd_loop(spec),
        "bwd_loop": make_bwd(spec, "loop"),
        "bwd_elem": make_bwd(spec, "elem"),
        "bwd_dh": make_bwd(spec, "dh"),
        **({"bwd_coarse": make_bwd(spec, "coarse")} if spec.coarse else {}),
        "wgrad_in": make_wgrad(spec, I, spec.k_in),
        "wgrad_rec": make_wgrad(spec, H, spec.k_rec),
        "dx": make_dx(spec, I, spec.k_in),
        "to_wt_in": make_to_wt(spec, I),
        "to_wt_rec": make_to_wt(spec, H),
    }
    out = {}
    for name, f in funcs.items():
        out[name] = f.with_attr("global_symbol", name)
    return out


def build_mcpu(spec: CpuLayerSpec) -> str:
    """The -mcpu a build of ``spec`` uses: the spec's, else the ISA class's baseline."""
    return spec.mcpu or {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "generic": ""}[spec.isa]


def tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def build_layer_library(spec: CpuLayerSpec, path: str) -> None:
    """Compile every kernel of ``spec`` into one shared library at ``path`` (export_library)."""
    import tvm

    mod = tvm.IRModule(layer_kernels(spec))
    lib = tvm.compile(mod, target=llvm_target(spec.isa, spec.mcpu))
    lib.export_library(path)


def host_mcpu() -> str:
    """LLVM's name for this machine's CPU (tuning for the build), "" if unknown."""
    try:
        from tvm.target import codegen

        return str(codegen.llvm_get_system_cpu())
    except Exception:  # pragma: no cover - depends on the TVM build
        return ""
