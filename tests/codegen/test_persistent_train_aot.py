"""Static checks of the persistent training-loop cubins (nvcc, no GPU): manifest entries
(cooperative launch, parameter order), ptxas registers / spills, shared memory, co-residency
on sm_80 (108 SMs) and sm_90 (132 SMs) and the instructions the design relies on in the SASS;
the issue's benchmark shapes (``slow``)."""
from __future__ import annotations

import re

import pytest

from rnn_sparsify.codegen.errors import UnsupportedGemm
from rnn_sparsify.codegen.persistent_sparse import ARCH_LIMITS
from rnn_sparsify.codegen.persistent_train import (
    PersistentTrainRequest, PersistentTrainSpec, coresidency_problem, max_hidden_size,
)

pytestmark = pytest.mark.tvm

# odd hidden sizes, RH dropout, coarse selection whose regions cross CTAs (H % (P*R) != 0)
SMALL = [PersistentTrainRequest(300, 4, 105, "bfloat16", (4, 8, 4)), PersistentTrainRequest(150, 3, 150, "float32")]
FWD_PARAMS = ["Ac", "Cs", "Hs", "W", "Xg", "bar", "idx", "Tn", "a"]
BWD_PARAMS = ["Ac", "Cs", "DC", "DH", "Dn", "Wb", "bar", "dY", "idx", "Tn", "a"]
COARSE_PARAMS = ["Ac", "Cs", "DC", "DH", "Dn", "Kp", "Sq", "Wb", "bar", "dY", "idx", "Tn", "a"]


def _ops(sass: str) -> list[str]:
    return re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", sass)


@pytest.fixture(scope="module")
def small_bundle(tvm, nvcc, tmp_path_factory):
    from rnn_sparsify.codegen.aot import compile_persistent_train

    out = tmp_path_factory.mktemp("ptbundle")
    m = compile_persistent_train(SMALL, ["sm_80", "sm_90"], out, cache_dir=tmp_path_factory.mktemp("ptcache"),
                                 progress=False)
    return out, m


def test_manifest_entries(small_bundle):
    import json

    out, m = small_bundle
    assert len(m.kernels) == 8  # 2 shapes x fwd/bwd x 2 archs
    raw = json.loads((out / "manifest.json").read_text())
    for e, d in zip(m.kernels, raw["kernels"]):
        spec = PersistentTrainSpec.from_dict(e.spec)
        assert d["launch"] == "cooperative"
        assert e.grid == (spec.grid, 1, 1) and e.block == (spec.threads, 1, 1)
        assert spec.grid <= ARCH_LIMITS[e.arch]["sms"] and spec.grid * spec.units >= spec.hidden_size
        # TVM's merged shared memory vs the spec's estimate (alignment only)
        assert 0 <= e.dynamic_smem_bytes - spec.smem_bytes() <= 256, (e.symbol, e.dynamic_smem_bytes)
        want = FWD_PARAMS if spec.part == "fwd" else (COARSE_PARAMS if spec.coarse else BWD_PARAMS)
        assert [p.name for p in e.params] == want, e.symbol
        assert [p.pointer for p in e.params[-2:]] == [False, False]  # Tn, a
        assert (out / e.cubin).is_file() and (out / e.ptx).is_file()


def test_registers_spills_coresidency(small_bundle):
    _, m = small_bundle
    for e in m.kernels:
        spec = PersistentTrainSpec.from_dict(e.spec)
        assert 16 <= e.registers <= 128, (e.symbol, e.registers)
        assert not e.spill_bytes, (e.symbol, e.spill_bytes)
        assert coresidency_problem(spec, e.arch, e.registers, e.dynamic_smem_bytes) is None


def test_sass_has_the_barrier_and_shared_memory(small_bundle):
    from rnn_sparsify.codegen.toolchain import sass

    out, m = small_bundle
    for e in m.kernels:
        ops = _ops(sass(out / e.cubin))
        count = lambda p: sum(1 for o in ops if o.startswith(p))  # noqa: E731
        assert count("ATOM") + count("RED") == 1, e.symbol  # the grid barrier's counter, once per step
        assert count("MEMBAR") >= 1 and count("CCTL") >= 1, e.symbol  # release fence, acquire (L1 invalidate)
        assert count("LDG.E.STRONG.GPU") >= 1, e.symbol  # the poll of the counter
        assert count("BAR.SYNC") >= 5, e.symbol  # CTA barriers between the phases
        assert count("LDS") >= 3, e.symbol  # weights, h / partial sums from shared memory
        if e.spec["part"] == "bwd":
            assert count("STS.128") >= 1, e.symbol  # W_hh columns copied with 16-byte stores
        assert count("HMMA") == 0  # SIMT FMA (tensor cores: not yet)


def test_coresidency_refusal(tvm, nvcc, tmp_path):
    from rnn_sparsify.codegen.aot import compile_persistent_train

    # 1500 x 4 gate rows of bf16 on 108 A100 SMs: 56 rows x 1500 x 2 B = 164 KB per CTA + h
    with pytest.raises(UnsupportedGemm, match="cannot be co-resident on sm_80"):
        compile_persistent_train([PersistentTrainRequest(1500, 20, 525, "bfloat16")], ["sm_80"], tmp_path / "b",
                                 cache_dir=tmp_path / "c", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("req,archs", [
    (PersistentTrainRequest(1500, 20, 525, "bfloat16"), ["sm_90"]),  # the 2x1500 benchmark, SD 0.65
    (PersistentTrainRequest(650, 20, 228, "bfloat16"), ["sm_80", "sm_90"]),
    (PersistentTrainRequest(512, 64, 512, "bfloat16", (4, 8, 4)), ["sm_80", "sm_90"]),  # coarse, no dropout
])
def test_benchmark_shapes(tvm, nvcc, tmp_path, req, archs):
    from rnn_sparsify.codegen.aot import compile_persistent_train
    from rnn_sparsify.codegen.toolchain import sass

    m = compile_persistent_train([req], archs, tmp_path / "b", cache_dir=tmp_path / "c", progress=False)
    assert len(m.kernels) == 2 * len(archs)
    for e in m.kernels:
        spec = PersistentTrainSpec.from_dict(e.spec)
        assert not e.spill_bytes and e.registers <= 128, (e.symbol, e.registers)
        assert e.dynamic_smem_bytes + 1024 <= ARCH_LIMITS[e.arch]["smem_block"]
        assert coresidency_problem(spec, e.arch, e.registers, e.dynamic_smem_bytes) is None
        ops = _ops(sass(tmp_path / "b" / e.cubin))
        assert sum(o.startswith(("ATOM", "RED")) for o in ops) == 1
        if spec.part == "bwd" and spec.hidden_size == 1500:
            assert (spec.units, spec.grid) == (12, 125)


def test_max_hidden_size_table():
    # the numbers docs/persistent_kernels.md quotes (bf16, batch 20, 35 % kept; estimated registers)
    assert max_hidden_size("sm_90") == {"fwd": 1700, "bwd": 1916, "both": 1700}
    assert max_hidden_size("sm_80") == {"fwd": 1292, "bwd": 1468, "both": 1292}


def test_one_unit_per_cta_builds(tvm):
    # hidden < SMs: one unit per CTA (a 1-element shared buffer once broke TVM's shared-memory merge)
    from rnn_sparsify.codegen.persistent_train import PersistentTrainRequest, cuda_source

    for spec in PersistentTrainRequest(40, 4, 20, "float32", (4, 8, 4)).specs("sm_90"):
        assert spec.units == 1 and spec.grid == 40
        assert f"{spec.name}_kernel" in cuda_source(spec, "sm_90")
