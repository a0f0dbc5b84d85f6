"""Static checks of the sparse persistent eval cubins (nvcc, no GPU): manifest entry, ptxas
registers / spills, shared memory, co-residency on sm_80 (108 SMs) and sm_90 (132 SMs), and
the instructions the design relies on in the SASS (``codegen/toolchain.sass``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rnn_sparsify.codegen.errors import UnsupportedGemm
from rnn_sparsify.codegen.persistent_sparse import (
    ARCH_LIMITS, PersistentEvalRequest, PersistentSparseSpec, blocks_per_sm, coresidency_problem, nnz_bound,
    spec_for_arch,
)

pytestmark = pytest.mark.tvm

SMALL = [PersistentEvalRequest(40, 4, 16, "float32"), PersistentEvalRequest(72, 8, 24, "bfloat16")]
# the benchmark: H 2304, 30 % (row bound 802 -> 808), batch 4, bf16
BENCH = PersistentEvalRequest(2304, 4, nnz_bound(2304, 0.3), "bfloat16")


def _ops(sass: str) -> list[str]:
    return re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", sass)


@pytest.fixture(scope="module")
def small_bundle(tvm, nvcc, tmp_path_factory):
    from rnn_sparsify.codegen.aot import compile_persistent

    cache = tmp_path_factory.mktemp("pcache")
    out = tmp_path_factory.mktemp("pbundle")
    manifest = compile_persistent(SMALL, ["sm_80", "sm_90"], out, cache_dir=cache, progress=False)
    return out, cache, manifest


def test_manifest_entries(small_bundle):
    out, _, manifest = small_bundle
    assert len(manifest.kernels) == 4
    raw = json.loads((out / "manifest.json").read_text())
    for e, d in zip(manifest.kernels, raw["kernels"]):
        spec = PersistentSparseSpec.from_dict(e.spec)
        assert d["launch"] == "cooperative"
        assert e.grid == (spec.grid, 1, 1) and e.block == (spec.threads, 1, 1)
        assert e.grid[0] <= ARCH_LIMITS[e.arch]["sms"]
        assert e.dynamic_smem_bytes == spec.smem_bytes() > 0
        # the kernel's parameter order (TVM sorts buffers by name) and the step count last; 16-bit
        # kernels take the packed-word format (one int32 per non-zero)
        assert spec.packed == (spec.dtype == "bfloat16")
        weights = ["Wp"] if spec.packed else ["Wc", "Wv"]
        assert [p.name for p in e.params] == ["C", "Hs", *weights, "Xg", "bar", "Tn"]
        assert e.params[-1].pointer is False
        assert (out / e.cubin).is_file() and (out / e.ptx).is_file()


def test_registers_spills_coresidency(small_bundle):
    _, _, manifest = small_bundle
    for e in manifest.kernels:
        spec = PersistentSparseSpec.from_dict(e.spec)
        assert 16 <= e.registers <= 128, (e.symbol, e.registers)
        assert not e.spill_bytes, (e.symbol, e.spill_bytes)
        assert coresidency_problem(spec, e.arch, e.registers) is None


def test_sass_has_the_barrier_smem_weights_and_wide_loads(small_bundle):
    from rnn_sparsify.codegen.toolchain import sass

    out, _, manifest = small_bundle
    for e in manifest.kernels:
        ops = _ops(sass(out / e.cubin))
        count = lambda p: sum(1 for o in ops if o.startswith(p))  # noqa: E731
        assert count("ATOM") + count("RED") >= 1, e.symbol  # the grid barrier's counter
        assert count("MEMBAR") >= 1, e.symbol  # the release fence before it
        assert count("BAR.SYNC") >= 3, e.symbol  # CTA barriers between the phases
        assert count("LDS") >= 2, e.symbol  # weights and h from shared memory
        assert count("STS.128") >= 1 and count("LDG.E.128") >= 1, e.symbol  # 16-byte copies into smem
        # h[col] of 4 batch columns in one load: fp32 x 4 = 16 bytes; bf16 x 8 = two 8-byte
        # vectors, which ptxas may merge into one 16-byte load
        wide = count("LDS.128") if e.spec["dtype"] == "float32" else count("LDS.64") + count("LDS.128")
        assert wide >= 1, (e.symbol, "no wide shared-memory load of h")
        if e.spec.get("packed"):  # one 32-bit load per non-zero (value + column), no 16-bit weight loads
            assert count("LDS.U16") == 0 and sum(1 for o in ops if o == "LDS") >= 1, e.symbol


def test_cache_hit(small_bundle, tmp_path):
    from rnn_sparsify.codegen import aot

    _, cache, _ = small_bundle
    aot.compile_persistent(SMALL, ["sm_80", "sm_90"], tmp_path / "b2", cache_dir=cache, progress=False)
    assert aot.compile_specs.last_stats["cache_hits"] == 4


def test_benchmark_shape_fits_h100_and_is_refused_on_a100(tvm, nvcc, tmp_path):
    from rnn_sparsify.codegen.aot import compile_persistent

    m = compile_persistent([BENCH], ["sm_90"], tmp_path / "b", cache_dir=tmp_path / "c", progress=False)
    (e,) = m.kernels
    assert e.grid == (128, 1, 1) and e.block == (576, 1, 1) and not e.spill_bytes
    assert e.dynamic_smem_bytes + 1024 <= ARCH_LIMITS["sm_90"]["smem_block"] and e.spec["nnz"] == 808
    assert e.spec["reg_nnz"] > 0  # part of every row in registers
    # A100: 164 KB of shared memory per SM cannot hold 105 CTAs' shares of 2304 x 30 %
    with pytest.raises(UnsupportedGemm, match="cannot be co-resident on sm_80"):
        compile_persistent([BENCH], ["sm_80"], tmp_path / "b80", cache_dir=tmp_path / "c", progress=False)


def test_blocks_per_sm_arithmetic():
    # the CUDA occupancy calculator's numbers for sm_90
    assert blocks_per_sm("sm_90", 256, 32, 0) == 8  # thread limit 2048 / 256
    assert blocks_per_sm("sm_90", 256, 64, 0) == 4  # 64 regs x 256 threads = 16384 registers
    assert blocks_per_sm("sm_90", 576, 48, 230400) == 1
    assert blocks_per_sm("sm_90", 576, 48, 232448) == 1  # the opt-in maximum + 1 KB reserved = 228 KB
    assert blocks_per_sm("sm_90", 576, 48, 232449) == 0
    assert blocks_per_sm("sm_80", 128, 255, 0) == 2  # 255 -> 256 regs/thread: 32768 per CTA
    spec = spec_for_arch(2304, 4, 752, "bfloat16", "sm_90")
    assert coresidency_problem(spec, "sm_90", 48) is None
    assert "cannot be co-resident" in coresidency_problem(spec, "sm_90", 120)  # 576 x 120 > 64K registers


def test_packed_word_format_halves_the_weight_loads_in_the_sass(tvm, nvcc, capsys):
    """``benchmarks/persistent_sass_loop.py``: in the inner loop over the shared-memory
    non-zeros, the packed-word kernel issues 2 shared loads per non-zero (the word and the h
    vector) where the two-array format issues 3, and no more instructions per non-zero."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "persistent_sass_loop.py"
    spec = importlib.util.spec_from_file_location("persistent_sass_loop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 0  # the benchmark shape: H 2304, 30 %, batch 4, bf16, sm_90
    rows = [r.split("|") for r in capsys.readouterr().out.splitlines() if r.startswith("| value") or r.startswith("| packed")]
    (two, packed) = [(float(r[6]), float(r[7]), int(r[3])) for r in rows]
    assert (two[1], packed[1]) == (3.0, 2.0), rows
    assert packed[0] <= two[0] and two[2] == packed[2] == 0, rows  # instructions per non-zero; no spills
