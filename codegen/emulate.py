"""Run the CUDA schedules of the indexed GEMMs on the CPU: the schedule's own index arithmetic,
checked without a GPU.

The LLVM build of :func:`rnn_sparsify.codegen.schedule.cpu` tests the *algorithm* (the
unscheduled function). What the GPU runs is the function after :func:`~.schedule.tensorcore`
or :func:`~.schedule.simt`: split into CTA tiles, warps and K stages, gathered into padded
shared-memory tiles, loaded into mma fragments through ``ldmatrix`` at the offsets of
:func:`~.intrin.ldmatrix_smem_offset`, multiplied, and stored from the fragment layout. A
mistake in any of these is invisible to the unscheduled build. :func:`build` runs that
scheduled function on the CPU:

1. the tensor-core schedule is applied with *emulated* intrinsics (:func:`emulated_intrins`):
   the same descriptions (what tensorize matches), but scalar TIR implementations that follow
   the PTX register layouts -- which lane of the warp holds which element after
   ``ldmatrix.x4`` (with the project's ``.trans`` flag and shared-memory offsets),
   ``mma.sync.m16n8k16.row.col`` (two per 16x16 fragment), the fragment fill and store;
2. every ``thread_binding`` loop becomes a serial loop, and ``shared``/``warp``/``local``
   buffers become ``global`` ones (:func:`serialize`). Serial thread loops keep the order a
   barrier gives: each cooperative copy of a K stage completes before the fragments read it;
3. the result is built for LLVM.

A software-pipelined K loop (:class:`~.gemm_gather.GatherRowsT`) keeps its stages and order,
hence the multi-buffered tiles and the prologue/body/epilogue, but loses its async stage: the
copies that are ``cp.async`` on the GPU complete at once here.

Not checked: barrier placement and data races (serial loops cannot race), the
``cp.async.wait_group`` counts (the CUDA source test checks them), bank conflicts,
the PTX strings the real intrinsics emit (the SASS tests look for HMMA/LDSM), and the PTX
register layouts themselves: they are transcribed from the PTX ISA into the stand-ins, and a
misreading that the ldmatrix and mma stand-ins share would cancel out unnoticed.
"""
from __future__ import annotations

import re

from .gemm_gather import IndexedGemm
from .intrin import LOCAL, M_DIM, N_DIM, WARP, MmaIntrins

__all__ = ["emulated_intrins", "serialize", "schedule_for_cpu", "build"]

_REGISTERED: dict[tuple, MmaIntrins] = {}


def _ldmatrix_emu(dtype: str, operand: str, transposed: bool):
    """``ldmatrix.x4`` as scalar loads: lane ``8*i + r`` supplies the address of row ``r`` of
    8x8 matrix ``i`` (the project's :func:`~.intrin.ldmatrix_smem_offset`); lane ``tx``
    receives in register pair ``i``: row ``tx//4``, columns ``2*(tx%4) + {0, 1}`` of matrix
    ``i`` -- transposed with ``.trans``: rows ``2*(tx%4) + {0, 1}``, column ``tx//4``."""
    from tvm.script import tirx as T

    from . import intrin

    desc, _ = intrin._ldmatrix(dtype, operand, transposed)
    trans = intrin.ldmatrix_trans(operand, transposed)
    rows, cols = intrin.ldmatrix_tile_shape(operand, transposed)
    smem_offset = intrin.ldmatrix_smem_offset

    def src(tx, i, j, stride):
        r = (2 * (tx % 4) + j) if trans else (tx // 4)
        c = (tx // 4) if trans else (2 * (tx % 4) + j)
        return smem_offset(8 * i + r, stride, transposed) + c

    @T.prim_func(s_tir=True)
    def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(shared_handle, (rows, cols), dtype, align=64, offset_factor=cols,
                                scope="shared", strides=[s0, s1])
        warp = T.match_buffer(warp_handle, (WARP, LOCAL), dtype, align=64, offset_factor=cols, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:rows, 0:cols])
            T.writes(warp[0:WARP, 0:LOCAL])
            for tx, i, j in T.grid(WARP, 4, 2):
                warp[tx, 2 * i + j] = shared[src(tx, i, j, s0) // s0, src(tx, i, j, s0) % s0]

    return desc, impl


def _mma_emu(dtype: str, a_trans: bool, b_trans: bool):
    """Two ``mma.sync.m16n8k16.row.col`` (B and C registers +0, then +4), element by element.
    PTX fragment layouts: A (m, k) in lane ``4*(m%8) + (k%8)//2``, register
    ``k%2 + 2*(m//8) + 4*(k//8)``; B (k, n): lane ``4*n + (k%8)//2``, register
    ``k%2 + 2*(k//8)``; C (m, n): lane ``4*(m%8) + n//2``, register ``n%2 + 2*(m//8)``."""
    from tvm.script import tirx as T
    from tvm.tirx import Cast

    from . import intrin

    desc, _ = intrin._mma(dtype, a_trans, b_trans)
    a_off = M_DIM if a_trans else intrin.K_DIM
    b_off = intrin.K_DIM if b_trans else N_DIM

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, LOCAL), dtype, align=64, offset_factor=a_off, scope="warp")
        B = T.match_buffer(b, (WARP, LOCAL), dtype, align=64, offset_factor=b_off, scope="warp")
        C = T.match_buffer(c, (WARP, LOCAL), "float32", align=64, offset_factor=N_DIM, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:LOCAL], A[0:WARP, 0:LOCAL], B[0:WARP, 0:LOCAL])
            T.writes(C[0:WARP, 0:LOCAL])
            for h, m, n, k in T.grid(2, 16, 8, 16):
                C[4 * (m % 8) + n // 2, 4 * h + n % 2 + 2 * (m // 8)] = C[
                    4 * (m % 8) + n // 2, 4 * h + n % 2 + 2 * (m // 8)
                ] + Cast("float32", A[4 * (m % 8) + (k % 8) // 2, (k % 2) + 2 * (m // 8) + 4 * (k // 8)]) * Cast(
                    "float32", B[4 * n + (k % 8) // 2, 4 * h + (k % 2) + 2 * (k // 8)]
                )

    return desc, impl


def _fill_emu():
    from tvm.script import tirx as T

    from . import intrin

    desc, _ = intrin._fill_f32()

    @T.prim_func(s_tir=True)
    def impl(a: T.handle) -> None:
        C = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:LOCAL])
            for t, l in T.grid(WARP, LOCAL):
                C[t, l] = T.float32(0)

    return desc, impl


def _store_emu():
    """The fragment store: element (i, j) of the 16x16 tile from its lane and register
    (:func:`~.intrin.ldmatrix_layout`, the layout ``mma_store`` uses in the CUDA codegen)."""
    from tvm.script import tirx as T

    from . import intrin

    desc, _ = intrin._store_f32_global()
    lay = intrin.ldmatrix_layout

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        C_warp = T.match_buffer(a, [WARP, LOCAL], dtype="float32", scope="warp", offset_factor=1)
        C = T.match_buffer(c, [M_DIM, N_DIM], dtype="float32", scope="global", offset_factor=1, strides=[s0, s1])
        with T.sblock("root"):
            T.reads(C_warp[0:WARP, 0:LOCAL])
            T.writes(C[0:M_DIM, 0:N_DIM])
            for i, j in T.grid(M_DIM, N_DIM):
                C[i, j] = C_warp[lay(i, j)[0], lay(i, j)[1]]

    return desc, impl


def emulated_intrins(dtype: str, a_trans: bool = False, b_trans: bool = False) -> MmaIntrins:
    """Register (once per process and formula) and return scalar stand-ins for the five
    tensor-core intrinsics, under names of their own (``rnn_sparsify.emu.*``: the CUDA
    intrinsics stay untouched). The ldmatrix stand-ins read the project's
    :func:`~.intrin.ldmatrix_smem_offset` and :func:`~.intrin.ldmatrix_trans` at registration,
    so a changed (or, in tests, a deliberately broken) formula gets intrinsics of its own."""
    from . import intrin

    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"tensor-core intrinsics exist for float16 and bfloat16, not {dtype!r}")
    formulas = (intrin.ldmatrix_smem_offset, intrin.ldmatrix_trans, intrin.ldmatrix_layout)
    key = (dtype, a_trans, b_trans, formulas)
    if key in _REGISTERED:
        return _REGISTERED[key]
    tag = "" if formulas == _DEFAULT_FORMULAS else f"v{len(_REGISTERED)}."  # unique per formula set
    _REGISTERED[key] = intrin.register_intrins(f"rnn_sparsify.emu.{tag}", dtype, a_trans, b_trans,
                                               _ldmatrix_emu, _mma_emu, _fill_emu, _store_emu)
    return _REGISTERED[key]


def _default_formulas():
    from . import intrin

    return (intrin.ldmatrix_smem_offset, intrin.ldmatrix_trans, intrin.ldmatrix_layout)


_DEFAULT_FORMULAS = _default_formulas()

_ASYNC_STAGES = re.compile(r'"software_pipeline_async_stages": \[[^\]]*\],?\s*')
_THREAD_BINDING = re.compile(r'T\.thread_binding\(([^()]*?),\s*thread="[^"]+"\)')


def serialize(mod):
    """``(module, n)``: ``mod`` with its ``n`` thread-bound loops serial and every ``shared``,
    ``warp`` and ``local`` buffer ``global`` (a rewrite of the TVMScript text, parsed again)."""
    from tvm.script import from_source

    text = mod.script()
    text, n = _THREAD_BINDING.subn(r"T.serial(\1)", text)
    # a software-pipelined K loop keeps its stages, order and multi-buffered tiles (what
    # InjectSoftwarePipeline builds from them is the same either way), but not the async
    # stage: serial copies complete at once, like cp.async after its wait_group
    text = _ASYNC_STAGES.sub("", text)
    for scope in ("shared", "warp", "local"):
        text = text.replace(f'"{scope}"', '"global"')
    if "thread_binding" in text:
        lines = [line for line in text.splitlines() if "thread_binding" in line][:3]
        raise RuntimeError(f"thread-bound loops left after serialize: {lines}")
    return from_source(text), n


def schedule_for_cpu(spec: IndexedGemm):
    """``(module, n_thread_loops)``: the CUDA schedule that :func:`~.schedule.cuda_schedule`
    picks for ``spec`` (tensor cores for fp16/bf16 with emulated intrinsics, SIMT for
    float32), serialized for the CPU."""
    from . import schedule

    sch = schedule.tensorcore(spec, intrins=emulated_intrins)
    if sch is None:
        sch = schedule.simt(spec)
    if sch is None:
        from .errors import UnsupportedGemm

        raise UnsupportedGemm(f"no CUDA schedule applies to {spec}")
    return serialize(sch.mod)


def build(spec: IndexedGemm):
    """The LLVM build of ``spec``'s CUDA schedule (see the module docstring); call it as
    ``build(spec)[spec.name](*tensors)`` in ``spec.params()`` order."""
    from .toolchain import import_tvm

    tvm = import_tvm()
    mod, _ = schedule_for_cpu(spec)
    return tvm.compile(mod, target="llvm")
