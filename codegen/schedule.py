"""Schedules for the indexed GEMMs of :mod:`rnn_sparsify.codegen.gemm_gather`.

* :func:`tensorcore` -- CUDA, fp16/bf16 inputs, fp32 accumulation on tensor cores: the gather
  blocks become the global->shared copies (``compute_at`` the K loop: the indexed load *is*
  the copy), shared->register through ``ldmatrix``, ``mma.sync.m16n8k16``, fp32 fragments
  stored to the padded output. One CTA per ``(bm x bn)`` tile and time step
  (``blockIdx.x`` = tile, ``blockIdx.y`` = step, or step x split-K slice: ``Tile.split_k``).
  A spec with ``pipeline_stages > 1`` (:class:`~.gemm_gather.GatherRowsT`: whole rows, 16-byte
  copies) gets a software-pipelined K loop whose copies become ``cp.async`` when compiled with
  :func:`pass_config`.
* :func:`simt` -- CUDA, float32: the same two-stage algorithm with shared-memory tiles and a
  register tile per thread (no tensor cores: the model is float32).
* :func:`cpu` -- LLVM: the function as written (the reference algorithm for tests).

Each returns a ``tvm.s_tir.Schedule``; ``None`` means "this schedule does not apply"
(the caller tries the next one).
"""
from __future__ import annotations

from .gemm_gather import IndexedGemm
from .intrin import fragment_index_map, tensor_core_intrins


def _fetch_to_shared(sch, block, at_loop, tile, vectorize: bool):
    """Make gather ``block`` the cooperative global->shared copy of one K stage."""
    sch.set_scope(block, 0, "shared")
    sch.compute_at(block, at_loop)
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops[-2:])
    vec = 8 if vectorize else 4
    _, ty, tx, v = sch.split(fused, factors=[None, tile.warps_m * tile.warps_n, 32, vec])
    sch.bind(tx, "threadIdx.x")
    sch.bind(ty, "threadIdx.y")
    if vectorize:
        sch.vectorize(v)
    else:
        sch.unroll(v)
    # pad rows by 8 elements (16 B) so ldmatrix reads of 8 rows hit distinct banks
    sch.storage_align(block, 0, axis=-2, factor=32, offset=8)


def _contiguous_inner(spec: IndexedGemm, operand: str) -> bool:
    """True when the gather block of ``operand`` can use 16-byte vector loads: its inner
    (shared-memory contiguous) axis reads a contiguous, unguarded source row."""
    M, N, K = spec.mnk
    Mp, Np, Kp = spec.padded
    kind = spec.kind
    if kind == "gather_k":
        return spec.P % 8 == 0 and Kp == K and (Mp == M if operand == "A" else Np == N)
    if kind == "gather_kn":
        if operand == "A":
            return Kp == K and Mp == M and K % 8 == 0
        return (spec.kn is None or spec.Q % 8 == 0) and Np == N and Kp == K and N % 8 == 0
    if kind == "gather_rows_t":  # whole padded rows, no guards (the caller pads): always
        return True
    if kind == "wgrad_t":
        if operand == "A":
            return Mp == M and Kp == K and M % 8 == 0
        return (spec.k is None or spec.P % 8 == 0) and Np == N and Kp == K and N % 8 == 0
    return False


def tensorcore(spec: IndexedGemm, intrins=tensor_core_intrins):
    """Tensor-core schedule for fp16/bf16 specs; ``None`` for other dtypes.

    ``intrins(dtype, a_trans, b_trans)`` gives the names of the five registered intrinsics to
    tensorize with: the CUDA ones by default; :mod:`rnn_sparsify.codegen.emulate` passes scalar
    stand-ins with the same descriptions to run this schedule on the CPU.
    """
    if spec.dtype not in ("float16", "bfloat16"):
        return None
    from tvm import s_tir

    tile = spec.tile
    names = intrins(spec.dtype, spec.a_trans, spec.b_trans)
    Mp, Np, Kp = spec.padded
    sch = s_tir.Schedule(spec.primfunc())
    block = sch.get_sblock("C")
    t, i, j, k = sch.get_loops(block)
    i, i_tc = sch.split(i, factors=[None, 16])
    j, j_tc = sch.split(j, factors=[None, 16])
    k, k_tc = sch.split(k, factors=[None, 16])
    sch.reorder(t, i, j, k, i_tc, j_tc, k_tc)
    block_outer = sch.blockize(i_tc)
    block_inner = block

    fm, fn = tile.bm // 16 // tile.warps_m, tile.bn // 16 // tile.warps_n
    i0, i2, i3 = sch.split(i, factors=[Mp // tile.bm, tile.warps_m, fm])
    j0, j2, j3 = sch.split(j, factors=[Np // tile.bn, tile.warps_n, fn])
    k0, k1 = sch.split(k, factors=[spec.k_slice // tile.bk, tile.bk // 16])
    sch.reorder(i0, j0, t, j2, i2, k0, k1, i3, j3)
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    sch.bind(t, "blockIdx.y")
    warp = sch.fuse(j2, i2)
    sch.bind(warp, "threadIdx.y")

    _fetch_to_shared(sch, sch.get_sblock("A_g"), k0, tile, _contiguous_inner(spec, "A"))
    _fetch_to_shared(sch, sch.get_sblock("B_g"), k0, tile, _contiguous_inner(spec, "B"))

    A_warp = sch.cache_read(block_outer, 0, "warp")
    B_warp = sch.cache_read(block_outer, 1, "warp")
    sch.compute_at(A_warp, k1)
    sch.compute_at(B_warp, k1)
    C_warp = sch.cache_write(block_outer, 0, "warp")
    sch.reverse_compute_at(C_warp, warp)
    ii, jj = sch.get_loops(C_warp)[-2:]
    io, ii = sch.split(ii, factors=[None, 16])
    jo, ji = sch.split(jj, factors=[None, 16])
    sch.reorder(io, jo, ii, ji)

    sch.decompose_reduction(block_outer, k0)
    block_init = sch.get_sblock("C_init")

    def frag_loop(b):
        r, c = sch.get_loops(b)[-2:]
        r0, r1 = sch.split(r, factors=[None, 16])
        c0, c1 = sch.split(c, factors=[None, 16])
        sch.reorder(r0, c0, r1, c1)
        return r1

    loop_a = frag_loop(A_warp)
    loop_b = frag_loop(B_warp)

    def imap(t, r, c):
        return (t, *fragment_index_map(r, c))

    sch.transform_layout(A_warp, ("write", 0), imap)
    sch.transform_layout(B_warp, ("write", 0), imap)
    sch.transform_layout(C_warp, ("read", 0), imap)
    sch.tensorize(loop_a, names.ldmatrix_a)
    sch.tensorize(loop_b, names.ldmatrix_b)
    sch.tensorize(sch.get_loops(block_inner)[-3], names.mma)
    sch.tensorize(sch.get_loops(block_init)[-2], names.fill)
    sch.tensorize(sch.get_loops(C_warp)[-2], names.store)
    stages = getattr(spec, "pipeline_stages", 1)
    if stages > 1:
        # k0's body: the A copy, the B copy, the k1 loop (ldmatrix + mma). The copies of stage
        # k0 + stages - 1 are issued while k0 computes (multi-buffered shared tiles), as cp.async
        # (async stage 0) when compiled with ASYNC_COPY_CONFIG
        for key, value in pipeline_annotations(stages).items():
            sch.annotate(k0, key, value)
    return sch


def pipeline_annotations(stages: int) -> dict[str, list[int]]:
    """Software-pipeline annotations of the K loop ``k0`` (body: A copy, B copy, mma loop):
    the copies in stage 0, issued ``stages - 1`` iterations ahead of the mma (``stages``
    shared-memory buffers), asynchronous (cp.async + commit/wait groups)."""
    return {"software_pipeline_stage": [0, 0, stages - 1], "software_pipeline_order": [0, 1, 2],
            "software_pipeline_async_stages": [0]}


ASYNC_COPY_CONFIG = {"tirx.use_async_copy": True}


def pass_config(spec: IndexedGemm) -> dict:
    """``tvm.compile`` pass config of ``spec``'s CUDA kernel: cp.async for pipelined specs."""
    return dict(ASYNC_COPY_CONFIG) if getattr(spec, "pipeline_stages", 1) > 1 else {}


SIMT_THREADS = (16, 16)  # (threadIdx.y, threadIdx.x) of the float32 schedule


def simt(spec: IndexedGemm):
    """float32 CUDA schedule: shared-memory K stages, a (bm/ty x bn/tx) register tile per thread."""
    if spec.dtype != "float32":
        return None
    from tvm import s_tir

    tile = spec.tile
    Mp, Np, Kp = spec.padded
    sch = s_tir.Schedule(spec.primfunc())
    block = sch.get_sblock("C")
    t, i, j, k = sch.get_loops(block)
    ty_n, tx_n = SIMT_THREADS
    if tile.bm % ty_n or tile.bn % tx_n:
        return None
    i0, i1, i2 = sch.split(i, factors=[Mp // tile.bm, ty_n, tile.bm // ty_n])
    j0, j1, j2 = sch.split(j, factors=[Np // tile.bn, tx_n, tile.bn // tx_n])
    k0, k1 = sch.split(k, factors=[spec.k_slice // tile.bk, tile.bk])
    sch.reorder(i0, j0, t, i1, j1, k0, k1, i2, j2)
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    sch.bind(t, "blockIdx.y")
    sch.bind(i1, "threadIdx.y")
    sch.bind(j1, "threadIdx.x")
    C_local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(C_local, j1)
    for name in ("A_g", "B_g"):
        g = sch.get_sblock(name)
        sch.set_scope(g, 0, "shared")
        sch.compute_at(g, k0)
        fused = sch.fuse(*sch.get_loops(g)[-2:])
        _, fy, fx = sch.split(fused, factors=[None, ty_n, tx_n])
        sch.bind(fy, "threadIdx.y")
        sch.bind(fx, "threadIdx.x")
    sch.decompose_reduction(block, k0)
    return sch


def cpu(spec: IndexedGemm):
    """LLVM schedule: the function exactly as generated (the reference algorithm for tests)."""
    from tvm import s_tir

    return s_tir.Schedule(spec.primfunc())


CUDA_SCHEDULES = (tensorcore, simt)


def launch_dims(spec: IndexedGemm, rule) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(grid, block)`` of the kernel that ``rule`` makes for ``spec`` (its thread bindings)."""
    Mp, Np, _ = spec.padded
    tile = spec.tile
    grid = ((Mp // tile.bm) * (Np // tile.bn), spec.out_shape[0], 1)  # y: step (x split-K slice)
    if rule is tensorcore:
        return grid, (32, tile.warps_m * tile.warps_n, 1)
    return grid, (SIMT_THREADS[1], SIMT_THREADS[0], 1)


def cuda_schedule(spec: IndexedGemm):
    """``(schedule, grid, block)`` of the first CUDA schedule that applies to ``spec``."""
    from .errors import UnsupportedGemm

    for rule in CUDA_SCHEDULES:
        sch = rule(spec)
        if sch is not None:
            grid, block = launch_dims(spec, rule)
            return sch, grid, block
    raise UnsupportedGemm(f"no CUDA schedule applies to {spec}")
