"""CUDA builds (nvcc, no GPU) of the whole-row input projection (``GatherRowsT``) of the
README's 2x650 LSTM (batch 20 and 64, keep 0.5, bf16, 35 steps): the kept rows of the
transposed operands are copied global->shared by ``cp.async`` (LDGSTS) in 16-byte vectors,
one 4-byte index load per 16-byte row segment, in a 3-stage software pipeline (commit /
wait_group), feeding HMMA through LDSM, without register spills, for sm_80 and sm_90."""
import re

import pytest

from rnn_sparsify.codegen import launch_report as lr
from rnn_sparsify.codegen.gemm_gather import GatherRowsT

from .test_schedule import _sass, build_all

pytestmark = [pytest.mark.tvm, pytest.mark.slow]

SPECS = {f"B{B}_{g.name}": g for B in (20, 64) for m, g in lr.readme_specs()[f"650/B{B}"].gemms()
         if m == "fwd_input"}
ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def built(tvm, nvcc, tmp_path_factory):
    return build_all(SPECS, ARCHS, tmp_path_factory)


def test_the_input_projection_is_the_row_kernel():
    assert len(SPECS) == 2 and all(isinstance(g, GatherRowsT) for g in SPECS.values())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(SPECS))
def test_row_gather_cubin(built, name, arch):
    entry, folder = built[name, arch]
    spec = SPECS[name]
    assert entry.spill_bytes == 0, f"{name} {arch}: {entry.spill_bytes} bytes of register spills"
    assert entry.registers is not None and entry.registers <= 255
    text = _sass(entry, folder)
    ldgsts = re.findall(r"LDGSTS\.E(?:\.\w+)*", text)
    assert ldgsts and all(i.endswith(".128") for i in ldgsts), f"{name} {arch}: cp.async not 16-byte: {set(ldgsts)}"
    # every copy of the K loop is a cp.async: no register-staged global loads of the operands
    # (the only other global loads are the 4-byte kept-row indices, one per LDGSTS)
    others = re.findall(r"\bLDG\.E(?:\.\w+)*", text)
    assert all(not i.endswith((".128", ".64", ".U16", ".16")) for i in others), set(others)
    assert len(others) == len(ldgsts), (len(others), len(ldgsts))
    assert "DEPBAR" in text and "LDGDEPBAR" in text  # commit / wait groups
    assert re.search(r"HMMA\.16816\.F32\.BF16", text) and "LDSM" in text
    # per K stage and thread: bk rows of the bm-column Wt tile and of the bn-column Xt tile,
    # 8 elements per LDGSTS (the K loop is unrolled whole or in part: a multiple of that)
    t = spec.tile
    per_stage = (t.bk * t.bm + t.bk * t.bn) // 8 // t.threads
    assert len(ldgsts) % per_stage == 0, (len(ldgsts), per_stage)


@pytest.mark.parametrize("name", list(SPECS))
def test_pipeline_waits(built, name):
    """The CUDA source of the 3-stage pipeline: cp.async.cg of 16 bytes, and the steady-state
    wait leaves two groups in flight, the epilogue drains them (wait_group 1, then 0)."""
    entry, folder = built[name, "sm_90"]
    cu = (folder / entry.source).read_text()
    assert "cp.async.cg.shared.global" in cu
    body = cu[cu.index(f"{entry.symbol}("):]
    waits = re.findall(r"cp_async_wait_group_async_wait_group_(\d+)\(\)", body)
    stages = SPECS[name].pipeline_stages
    assert waits[0] == str(stages - 1) and waits[-2:] == ["1", "0"], waits
