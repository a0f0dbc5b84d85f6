"""TVM (LLVM target) CPU kernels for ``eval()`` of a weight-sparse LSTM layer.

Build-time only (needs ``apache-tvm``); the run-time side is
:mod:`rnn_sparsify.kernels.cpu_sparse_eval`, which loads the exported ``.so`` with ``tvm_ffi``
alone. The CPU counterpart of the sparse persistent RNN (technique 4): at small batch a dense
LSTM reads every weight every step (``nn.LSTM``, 2x650, reads 6.8 MB of ``W_hh`` per step and
layer); a 90 %-pruned ``W_hh`` in a compact row format (1 MB) stays in L2 across all steps.

Format (built by the run time from the weight masks; see ``docs/cpu_kernels.md``):

* gate rows interleaved by unit: row ``4*j + g`` is gate ``g`` (i, f, g, o) of unit ``j``, so
  the task that owns a unit finishes its cell update from registers;
* padded CSR: ``indptr (R+1,)`` int32, ``col`` (int16 when the matrix is narrower than 32768
  columns, else int32), ``val`` float32; every row's non-zeros are padded with zero entries
  (``col = 0, val = 0``) to a multiple of ``P`` (``P`` independent accumulator chains);
* activations batch-innermost: ``Xt (n, Np)`` with ``Np >= T*Bp`` (column ``t*Bp + b``), the
  gates ``G (R, Np)``, the states ``Hs, Cs (T+1, H, Bp)``; the batch is padded to ``Bp``.

Kernels (``Tn`` and ``Np`` symbolic; sizes, batch and index width static):

==========  ================================================================================
spmm_in     ``G[r, :] = bias[r] + sum_j val[j] * Xt[col[j], :]`` for every gate row: the input
            projection of all steps at once (``NC`` columns per register tile)
rec_loop    the recurrence: per step and unit, the four gate rows' sparse dot products with
            ``h_{t-1}`` (``P`` accumulators each), then the fused cell update
==========  ================================================================================

The summation order differs from a dense GEMM (partial sums per chain): results agree with
the dense masked computation to float32 rounding (tests: 2e-5 relative).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .cpu_lstm import _sigmoid, _tanh, build_mcpu, llvm_target, tvm_version  # noqa: F401

SPARSE_GENERATOR_VERSION = "5"
U = 16  # units per parallel task of rec_loop

#: columns per register tile of spmm_in, per ISA class (8 vector accumulators)
NC_OF = {"avx512": 128, "avx2": 64, "generic": 32}
#: floats per vector register
V_OF = {"avx512": 16, "avx2": 8, "generic": 4}
#: non-zeros of a row are padded to a multiple of P (P accumulator chains in rec_loop)
P = 8
PACK_ON = True


@dataclass(frozen=True)
class CpuSparseEvalSpec:
    """Static parameters of the eval kernels of one layer/direction (``T`` symbolic)."""

    input_size: int
    hidden_size: int
    batch: int  # Bp: the batch padded to a multiple of 4
    isa: str
    mcpu: str = ""

    kind = "sparse_eval"

    @property
    def rows(self) -> int:
        return 4 * self.hidden_size

    @property
    def nc(self) -> int:
        return NC_OF[self.isa]

    @property
    def vec(self) -> int:
        return V_OF[self.isa]

    def idx_dtype(self, n: int) -> str:
        return "int16" if n < 32768 else "int32"

    @property
    def chains(self) -> int:
        """Accumulator chains of rec_loop: about 8 vector registers, a divisor of ``P``."""
        return max(1, min(P, P * self.vec // max(self.batch, self.vec)))

    @property
    def hidden_padded(self) -> int:
        return -(-self.hidden_size // U) * U

    def off_dtype(self) -> str:
        """Index type of rec_loop's offsets ``col * batch``."""
        return "int16" if self.hidden_size * self.batch < 32768 else "int32"

    def to_dict(self) -> dict:
        return {"generator": "sparse-eval-" + SPARSE_GENERATOR_VERSION, "kind": self.kind,
                **asdict(self)}

    def describe(self) -> str:
        return (f"a weight-sparse LSTM layer in eval (input {self.input_size}, hidden "
                f"{self.hidden_size}, batch {self.batch}, {self.isa})")


def pad_batch(b: int, isa: str) -> int:
    """The batch the kernels run: 4, 8, else a multiple of 8 (of 4 with 128-bit vectors)."""
    v = V_OF[isa]
    for cand in (4, 8):
        if b <= cand and cand <= v:
            return cand
    return -(-b // 8) * 8 if v >= 8 else -(-b // 4) * 4


def _tree(terms):
    """Pairwise sum of a list of PrimExprs (any length)."""
    while len(terms) > 1:
        half = len(terms) // 2
        terms = [terms[j] + terms[j + half] for j in range(half)] + terms[2 * half:]
    return terms[0]


def make_spmm_in(spec: CpuSparseEvalSpec):
    """Input projection of all steps: ``NC``-column tiles (8 vector accumulators), then
    ``V``-column tail tiles with ``P`` accumulator chains (``Np`` is a multiple of ``V``)."""
    from tvm.script import tirx as T

    R, n, NC, V = spec.rows, spec.input_size, spec.nc, spec.vec
    idt = spec.idx_dtype(n)

    @T.prim_func
    def spmm_in(ip_h: T.handle, col_h: T.handle, val_h: T.handle, b_h: T.handle, x_h: T.handle,
                g_h: T.handle):
        T.func_attr({"global_symbol": "spmm_in", "tirx.noalias": True})
        Np = T.int32()
        nnz = T.int32()
        indptr = T.match_buffer(ip_h, (R + 1,), "int32")
        col = T.match_buffer(col_h, (nnz,), idt)
        val = T.match_buffer(val_h, (nnz,), "float32")
        bias = T.match_buffer(b_h, (R,), "float32")
        Xt = T.match_buffer(x_h, (n, Np), "float32")
        G = T.match_buffer(g_h, (R, Np), "float32")
        for r in T.parallel(R):
            acc = T.alloc_buffer((NC,), "float32", scope="local")
            tacc = T.alloc_buffer((P, V), "float32", scope="local")
            for c in range(Np // NC):
                for v in T.vectorized(NC):
                    acc[v] = bias[r]
                for j in range(indptr[r + 1] - indptr[r]):
                    for v in T.vectorized(NC):
                        acc[v] = acc[v] + val[indptr[r] + j] * Xt[T.Cast("int32", col[indptr[r] + j]), c * NC + v]
                for v in T.vectorized(NC):
                    G[r, c * NC + v] = acc[v]
            for c in range((Np % NC) // V):
                for q in T.unroll(P):
                    for v in T.vectorized(V):
                        tacc[q, v] = T.float32(0)
                for jj in range((indptr[r + 1] - indptr[r]) // P):
                    for q in T.unroll(P):
                        for v in T.vectorized(V):
                            tacc[q, v] = tacc[q, v] + val[indptr[r] + jj * P + q] * Xt[
                                T.Cast("int32", col[indptr[r] + jj * P + q]), (Np // NC) * NC + c * V + v]
                for v in T.vectorized(V):
                    G[r, (Np // NC) * NC + c * V + v] = bias[r] + _tree([tacc[q, v] for q in range(P)])

    return spmm_in


def make_rec_loop(spec: CpuSparseEvalSpec):
    """The recurrence: per step and block of ``U`` units, each gate row's sparse dot product
    with ``h_{t-1}`` (``PK`` accumulator chains over the row's ``P``-padded non-zeros, reduced
    right after the row), then the cell update of the block vectorised over (unit, batch)."""
    from tvm.script import tirx as T

    H, B, V = spec.hidden_size, spec.batch, spec.vec
    R = spec.rows
    idt = spec.off_dtype()
    NUB = -(-H // U)
    Hp = NUB * U
    PK = spec.chains
    CW = min(V, U * B)  # lanes per vector of the cell update
    # PACK non-zeros per vector FMA when the batch is narrower than a vector register
    PACK = V // B if (B < V and V % B == 0 and P % (V // B) == 0 and PACK_ON) else 1
    SEL = [(i // B) * PACK + i // B for i in range(PACK * B)]  # lane pk of the pk-th copy
    VW = max(w for w in (1, 2, 4, 8, 16) if w <= V and B % w == 0)
    NBC = B // VW
    CAT = list(range(PACK * B))
    assert (U * B) % CW == 0

    @T.prim_func
    def rec_loop(ip_h: T.handle, off_h: T.handle, val_h: T.handle, g_h: T.handle, hs_h: T.handle,
                 cs_h: T.handle):
        T.func_attr({"global_symbol": "rec_loop", "tirx.noalias": True})
        Tn = T.int32()
        Np = T.int32()
        nnz = T.int32()
        indptr = T.match_buffer(ip_h, (R + 1,), "int32")
        off = T.match_buffer(off_h, (nnz,), idt)  # column * B: the offset of h[col, 0]
        val = T.match_buffer(val_h, (nnz,), "float32")
        G = T.match_buffer(g_h, (R, Np), "float32")
        Hs = T.match_buffer(hs_h, (Tn, Hp * B), "float32")  # Tn = steps + 1; [t, k*B + b]
        Cs = T.match_buffer(cs_h, (Tn, Hp * B), "float32")
        for t in range(Tn - 1):
            for ub in T.parallel(NUB):
                acc = T.alloc_buffer((PK, B), "float32", scope="local")
                pacc = T.alloc_buffer((P // PACK, PACK * B) if PACK > 1 else (1, 1), "float32", scope="local")
                gs = T.alloc_buffer((4, U * B), "float32", scope="local")
                e = T.alloc_buffer((5, CW), "float32", scope="local")
                for u in range(U):
                    if ub * U + u < H:
                        for g in T.unroll(4):
                            for q in T.unroll(PK):
                                for bc in T.unroll(NBC):
                                    for b in T.vectorized(VW):
                                        acc[q, bc * VW + b] = T.float32(0)
                            if PACK > 1:
                                for q2 in T.unroll(P // PACK):
                                    for l in T.vectorized(PACK * B):
                                        pacc[q2, l] = T.float32(0)
                            if PACK > 1:
                                for jj in range((indptr[(ub * U + u) * 4 + g + 1] - indptr[(ub * U + u) * 4 + g]) // P):
                                    for q2 in T.unroll(P // PACK):
                                        pacc[q2, T.ramp(0, 1, V)] = pacc[q2, T.ramp(0, 1, V)] + T.Shuffle(
                                            [val[T.ramp(indptr[(ub * U + u) * 4 + g] + jj * P + q2 * PACK, 1, PACK)] for _ in range(B)], SEL) * T.Shuffle(
                                            [Hs[t, T.ramp(T.Cast("int32", off[indptr[(ub * U + u) * 4 + g] + jj * P + q2 * PACK + pk]), 1, B)]
                                             for pk in range(PACK)], CAT)
                                for b in T.vectorized(B):
                                    gs[g, u * B + b] = G[(ub * U + u) * 4 + g, t * B + b] + _tree(
                                        [pacc[q2, pk * B + b] for q2 in range(P // PACK) for pk in range(PACK)])
                            else:  # the batch in NBC vectors of VW lanes (power-of-two widths)
                                for jj in range((indptr[(ub * U + u) * 4 + g + 1] - indptr[(ub * U + u) * 4 + g]) // P):
                                    for q in T.unroll(P):
                                        for bc in T.unroll(NBC):
                                            for b in T.vectorized(VW):
                                                acc[q % PK, bc * VW + b] = acc[q % PK, bc * VW + b] + val[indptr[(ub * U + u) * 4 + g] + jj * P + q] * Hs[
                                                    t, T.Cast("int32", off[indptr[(ub * U + u) * 4 + g] + jj * P + q]) + bc * VW + b]
                                for bc in T.unroll(NBC):
                                    for b in T.vectorized(VW):
                                        gs[g, u * B + bc * VW + b] = G[(ub * U + u) * 4 + g, t * B + bc * VW + b] + _tree(
                                            [acc[q, bc * VW + b] for q in range(PK)])
                    else:
                        for g in T.unroll(4):
                            for b in T.vectorized(B):
                                gs[g, u * B + b] = T.float32(0)
                for lo in range(U * B // CW):
                    for l in T.vectorized(CW):
                        e[0, l] = _sigmoid(T, gs[0, lo * CW + l])
                        e[1, l] = _sigmoid(T, gs[1, lo * CW + l])
                        e[2, l] = _tanh(T, gs[2, lo * CW + l])
                        e[3, l] = _sigmoid(T, gs[3, lo * CW + l])
                        e[4, l] = e[1, l] * Cs[t, ub * U * B + lo * CW + l] + e[0, l] * e[2, l]
                        Cs[t + 1, ub * U * B + lo * CW + l] = e[4, l]
                        Hs[t + 1, ub * U * B + lo * CW + l] = e[3, l] * _tanh(T, e[4, l])

    return rec_loop


def sparse_eval_kernels(spec: CpuSparseEvalSpec) -> dict:
    return {"spmm_in": make_spmm_in(spec), "rec_loop": make_rec_loop(spec)}


KERNEL_NAMES = ("spmm_in", "rec_loop")


def build_library(spec: CpuSparseEvalSpec, path: str) -> None:
    """Compile both kernels of ``spec`` into one shared library at ``path`` (export_library)."""
    import tvm

    mod = tvm.IRModule(sparse_eval_kernels(spec))
    lib = tvm.compile(mod, target=llvm_target(spec.isa, spec.mcpu))
    lib.export_library(path)
