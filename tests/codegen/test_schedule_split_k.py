"""CUDA builds (nvcc, no GPU) of the split-K kernels of the README's 2x650 LSTM at batch 20
(keep 0.5, bf16): the per-step ones and the whole-sequence dx, with the tiles
``LSTMSpec.gemms()`` gives them: tensor cores (HMMA fed by LDSM), no spills, and the
manifest's grid = the >= 100 CTAs of the static report."""
import math
import re

import pytest

from rnn_sparsify.codegen import launch_report as lr

from .test_schedule import _sass, build_all

pytestmark = [pytest.mark.tvm, pytest.mark.slow]

SPECS = {f"{m}_{g.name}": g for m, g in lr.readme_specs()["650/B20"].gemms() if g.T == 1 or m == "bwd_data"}
ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def built(tvm, nvcc, tmp_path_factory):
    return build_all(SPECS, ARCHS, tmp_path_factory)


def test_three_split_k_kernels():
    assert len(SPECS) == 3 and all(g.tile.split_k > 1 for g in SPECS.values())
    assert sorted(g.T for g in SPECS.values()) == [1, 1, 35]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(SPECS))
def test_split_k_cubin(built, name, arch):
    entry, folder = built[name, arch]
    spec = SPECS[name]
    assert math.prod(entry.grid) == spec.ctas >= 100
    assert entry.grid[1] == spec.T * spec.tile.split_k
    assert entry.spill_bytes == 0, f"{name} {arch}: {entry.spill_bytes} bytes of register spills"
    assert entry.registers is not None and entry.registers <= 255
    text = _sass(entry, folder)
    assert re.search(r"HMMA\.16816\.F32\.BF16", text), f"{name} {arch}: no bf16 HMMA"
    assert "LDSM" in text
