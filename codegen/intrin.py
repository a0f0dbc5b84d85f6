"""Tensor-core intrinsics (ldmatrix + mma.sync m16n8k16, fp32 accumulation) for fp16 and bf16.

TVM 0.27 ships these only for fp16, inside ``tvm.s_tir.tensor_intrin.cuda``, whose import
parses ~80 TVMScript functions (30-60 s on 2 cores). This module defines the five we need,
for both 16-bit input types, and registers them on first use (~1 s). The definitions follow
upstream ``get_ldmatrix_intrin`` / ``get_mma_intrin`` / ``get_mma_fill_intrin`` /
``get_mma_store_intrin``; the only change is the data type (``ldmatrix`` moves ``.b16``
words, so bf16 needs no other change, and ``mma.sync`` takes ``bf16`` operands).

Names are prefixed ``rnn_sparsify.`` so they never collide with upstream's registry. Import
only through :func:`tensor_core_intrins`, after :func:`rnn_sparsify.codegen.toolchain.import_tvm`.
"""
from __future__ import annotations

from dataclasses import dataclass

M_DIM = N_DIM = K_DIM = 16
WARP = 32
LOCAL = (M_DIM * K_DIM) // WARP  # 8 elements of a 16x16 fragment per thread
_ABBREV = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_INDEX_MAP_FUNC = "tirx.index_map.shared_16x16_to_ldmatrix_32x8_layout"


def ldmatrix_layout(i, j):
    """(row, col) of a 16x16 fragment -> (thread, local element) of the mma.sync register layout."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + (j % 2)


def fragment_index_map(i, j):
    """Index map for ``transform_layout`` of a warp-scope buffer tiled in 16x16 fragments."""
    return (i // 16, j // 16, *ldmatrix_layout(i % 16, j % 16))


@dataclass(frozen=True)
class MmaIntrins:
    """Registered intrinsic names for one input dtype and operand layout."""

    ldmatrix_a: str
    ldmatrix_b: str
    mma: str
    fill: str
    store: str


_REGISTERED: dict[tuple[str, bool, bool], MmaIntrins] = {}


def _register_index_map() -> None:
    """The CUDA codegen of ``mma_store`` looks this global function up by name."""
    import tvm_ffi
    from tvm.runtime import convert

    if tvm_ffi.get_global_func(_INDEX_MAP_FUNC, allow_missing=True) is not None:
        return

    def _imap(ind):
        return convert(list(ldmatrix_layout(ind[0], ind[1])))

    tvm_ffi.register_global_func(_INDEX_MAP_FUNC, _imap)


def ldmatrix_trans(operand: str, transposed: bool) -> bool:
    """The ``.trans`` flag of the ``ldmatrix`` that loads ``operand`` ("A" or "B") from a
    shared tile stored ``transposed`` (A: ``[k, m]``; B: ``[n, k]``). mma.sync wants A row-major
    and B column-major fragments, hence the inversion for B."""
    return transposed if operand == "A" else not transposed


def ldmatrix_tile_shape(operand: str, transposed: bool) -> tuple[int, int]:
    """(rows, cols) of the 16x16 shared tile of ``operand`` as stored."""
    if operand == "A":
        return (K_DIM, M_DIM) if transposed else (M_DIM, K_DIM)
    return (N_DIM, K_DIM) if transposed else (K_DIM, N_DIM)


def ldmatrix_smem_offset(tx, stride, transposed: bool):
    """Element offset (from the tile's start, row stride ``stride``) of the row that lane ``tx``
    hands to ``ldmatrix.x4``: lane ``8*i + r`` gives row ``r`` of 8x8 matrix ``i``. The four
    matrices are the tile's quadrants, in the order the mma fragment registers expect."""
    from tvm.runtime import convert

    half = convert(WARP // 2)
    if transposed:
        return stride * 8 * (tx // half) + stride * (tx % 8) + 8 * ((tx % half) // 8)
    return stride * (tx % half) + 8 * (tx // half)


def _ldmatrix(dtype: str, operand: str, transposed: bool):
    """Shared (16x16, row-major in its own layout) -> warp fragment, via ``ldmatrix.x4``."""
    from tvm.runtime import convert
    from tvm.script import tirx as T

    trans_in_ldmatrix = ldmatrix_trans(operand, transposed)
    rows, cols = ldmatrix_tile_shape(operand, transposed)

    def smem_offset(tx, stride):
        return ldmatrix_smem_offset(tx, stride, transposed)

    @T.prim_func(s_tir=True)
    def desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(
            shared_handle, (rows, cols), dtype, align=64, offset_factor=cols, scope="shared"
        )
        warp = T.match_buffer(
            warp_handle, (WARP, LOCAL), dtype, align=64, offset_factor=cols, scope="warp"
        )
        with T.sblock("root"):
            T.reads(shared[0:rows, 0:cols])
            T.writes(warp[0:WARP, 0:LOCAL])
            for ax0, ax1 in T.grid(rows, cols):
                with T.sblock("shared_warp"):
                    v0, v1 = T.axis.remap("SS", [ax0, ax1])
                    T.reads(shared[v0, v1])
                    thread_id, local_id = T.meta_var(ldmatrix_layout(v0, v1))
                    T.writes(warp[thread_id, local_id])
                    warp[thread_id, local_id] = shared[v0, v1]

    @T.prim_func(s_tir=True)
    def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(
            shared_handle,
            (rows, cols),
            dtype,
            align=64,
            offset_factor=cols,
            scope="shared",
            strides=[s0, s1],
        )
        warp = T.match_buffer(
            warp_handle, (WARP, LOCAL), dtype, align=64, offset_factor=cols, scope="warp"
        )
        with T.sblock("root"):
            T.reads(shared[0:rows, 0:cols])
            T.writes(warp[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(
                    T.ptx_legacy.ldmatrix(
                        trans_in_ldmatrix,
                        4,
                        ".b16",
                        warp.data,
                        warp.elem_offset + convert(LOCAL) * tx,
                        shared.access_ptr("r"),
                        smem_offset(tx, s0),
                        dtype=dtype,
                    )
                )

    return desc, impl


def _mma(dtype: str, a_trans: bool, b_trans: bool):
    """C(16x16, fp32) += A(16x16) @ B(16x16) as two ``mma.sync.m16n8k16`` per warp."""
    from tvm.runtime import convert
    from tvm.script import tirx as T
    from tvm.tirx import Cast

    ab = _ABBREV[dtype]
    a_off = M_DIM if a_trans else K_DIM
    b_off = K_DIM if b_trans else N_DIM

    def swap(i, j, flag):
        return (j, i) if flag else (i, j)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, LOCAL), dtype, align=64, offset_factor=a_off, scope="warp")
        B = T.match_buffer(b, (WARP, LOCAL), dtype, align=64, offset_factor=b_off, scope="warp")
        C = T.match_buffer(c, (WARP, LOCAL), "float32", align=64, offset_factor=N_DIM, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:LOCAL], A[0:WARP, 0:LOCAL], B[0:WARP, 0:LOCAL])
            T.writes(C[0:WARP, 0:LOCAL])
            for i, j, k in T.grid(M_DIM, N_DIM, K_DIM):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    ar, ac = T.meta_var(swap(vi, vk, a_trans))
                    br, bc = T.meta_var(swap(vk, vj, b_trans))
                    tc, lc = T.meta_var(ldmatrix_layout(vi, vj))
                    ta, la = T.meta_var(ldmatrix_layout(ar, ac))
                    tb, lb = T.meta_var(ldmatrix_layout(br, bc))
                    T.reads(C[tc, lc], A[ta, la], B[tb, lb])
                    T.writes(C[tc, lc])
                    C[tc, lc] += Cast("float32", A[ta, la]) * Cast("float32", B[tb, lb])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, LOCAL), dtype, align=64, offset_factor=a_off, scope="warp")
        B = T.match_buffer(b, (WARP, LOCAL), dtype, align=64, offset_factor=b_off, scope="warp")
        C = T.match_buffer(c, (WARP, LOCAL), "float32", align=64, offset_factor=N_DIM, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:LOCAL], A[0:WARP, 0:LOCAL], B[0:WARP, 0:LOCAL])
            T.writes(C[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(
                    T.ptx_legacy.mma(
                        "m16n8k16", "row", "col", ab, ab, "fp32",
                        A.data, A.elem_offset + tx * convert(LOCAL),
                        B.data, B.elem_offset + tx * convert(LOCAL),
                        C.data, C.elem_offset + tx * convert(LOCAL),
                        False, dtype="float32",
                    )
                )
                T.evaluate(
                    T.ptx_legacy.mma(
                        "m16n8k16", "row", "col", ab, ab, "fp32",
                        A.data, A.elem_offset + tx * convert(LOCAL),
                        B.data, B.elem_offset + tx * convert(LOCAL) + convert(LOCAL) // 2,
                        C.data, C.elem_offset + tx * convert(LOCAL) + convert(LOCAL) // 2,
                        False, dtype="float32",
                    )
                )

    return desc, impl


def _fill_f32():
    from tvm.script import tirx as T
    from tvm.tirx import FloatImm

    zero = FloatImm("float32", 0.0)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle) -> None:
        C = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:LOCAL])
            for i0, i1 in T.grid(M_DIM, N_DIM):
                with T.sblock("C_warp"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    t, l = T.meta_var(ldmatrix_layout(i, j))
                    T.reads()
                    T.writes(C[t, l])
                    C[t, l] = zero

    @T.prim_func(s_tir=True)
    def impl(a: T.handle) -> None:
        C = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.cuda.mma_fill_legacy(LOCAL, C.data, C.elem_offset, dtype="float32"))

    return desc, impl


def _store_f32_global():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        C_warp = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp")
        C = T.match_buffer(c, [M_DIM, N_DIM], dtype="float32", scope="global")
        with T.sblock("root"):
            T.reads(C_warp[0:WARP, 0:LOCAL])
            T.writes(C[0:M_DIM, 0:N_DIM])
            for i0, i1 in T.grid(M_DIM, N_DIM):
                with T.sblock("C_warp"):
                    v0, v1 = T.axis.remap("SS", [i0, i1])
                    t, l = T.meta_var(ldmatrix_layout(v0, v1))
                    T.reads(C_warp[t, l])
                    T.writes(C[v0, v1])
                    C[v0, v1] = C_warp[t, l]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        C_warp = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp", offset_factor=1)
        C = T.match_buffer(
            c, [M_DIM, N_DIM], dtype="float32", scope="global", offset_factor=1, strides=[s0, s1]
        )
        with T.sblock("root"):
            T.reads(C_warp[0:WARP, 0:LOCAL])
            T.writes(C[0:M_DIM, 0:N_DIM])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(
                    T.cuda.mma_store_legacy(
                        M_DIM, N_DIM, C.access_ptr("w"), C_warp.data, C_warp.elem_offset, s0,
                        dtype="float32",
                    )
                )

    return desc, impl


def tensor_core_intrins(dtype: str, a_trans: bool = False, b_trans: bool = False) -> MmaIntrins:
    """Register (once per process) and return the intrinsic names for ``dtype`` in {float16, bfloat16}.

    ``a_trans``: the A tile is stored K-major in shared memory (``[k, m]``); ``b_trans``: the B
    tile is stored N-major (``[n, k]``, the layout of a PyTorch weight).
    """
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"tensor-core intrinsics exist for float16 and bfloat16, not {dtype!r}")
    key = (dtype, a_trans, b_trans)
    if key in _REGISTERED:
        return _REGISTERED[key]
    _register_index_map()
    _REGISTERED[key] = register_intrins("rnn_sparsify.", dtype, a_trans, b_trans,
                                        _ldmatrix, _mma, _fill_f32, _store_f32_global)
    return _REGISTERED[key]


def register_intrins(prefix: str, dtype: str, a_trans: bool, b_trans: bool, ldmatrix, mma, fill, store) -> MmaIntrins:
    """Register (each name once per process) the five intrinsics of ``(dtype, a_trans, b_trans)``
    under ``prefix`` from their ``(desc, impl)`` makers: ``ldmatrix(dtype, "A" | "B", trans)``,
    ``mma(dtype, a_trans, b_trans)``, ``fill()``, ``store()``. The CUDA set
    (:func:`tensor_core_intrins`) and the CPU stand-ins (``emulate.emulated_intrins``) share it,
    so the two name the same intrinsic the same way."""
    from tvm.s_tir import TensorIntrin

    ab = _ABBREV[dtype]
    names = MmaIntrins(
        ldmatrix_a=f"{prefix}ldmatrix_{ab}_a{'_t' if a_trans else ''}",
        ldmatrix_b=f"{prefix}ldmatrix_{ab}_b{'_t' if b_trans else ''}",
        mma=f"{prefix}mma_{ab}{ab}f32{'_ta' if a_trans else ''}{'_tb' if b_trans else ''}",
        fill=f"{prefix}mma_fill_16x16_f32",
        store=f"{prefix}mma_store_16x16_f32_global",
    )
    makers = {
        names.ldmatrix_a: lambda: ldmatrix(dtype, "A", a_trans),
        names.ldmatrix_b: lambda: ldmatrix(dtype, "B", b_trans),
        names.mma: lambda: mma(dtype, a_trans, b_trans),
        names.fill: fill,
        names.store: store,
    }
    for name, make in makers.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *make())
    return names
