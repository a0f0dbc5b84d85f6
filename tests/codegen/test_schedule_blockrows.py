"""CUDA builds of the fine-grained gate-sparsity generators (no GPU needed): the fp16/bf16
kernels run on tensor cores (HMMA fed by LDSM, no spills) for sm_80 and sm_90 -- both tile
shapes allow it: BlockRowsData gathers into a dense tile, BlockRowsWgrad pads Mx to its
16-row tile -- and the float32 ones on FFMA."""
import re

import pytest

from rnn_sparsify.codegen.gemm_gather import BlockRowsData, BlockRowsWgrad

from .test_schedule import _sass, build_all

pytestmark = pytest.mark.tvm

SPECS = {
    # row granularity (My = 1) as the backend and lstm_spec use them; My = 8 for the data one
    "blockrows_data_bf16": BlockRowsData(S=10, Mx=4, My=8, nb=3, kb=2, K=48, k=24, dtype="bfloat16"),
    "blockrows_data_fp16_rows": BlockRowsData(S=10, Mx=4, My=1, nb=24, kb=16, K=48, k=None, dtype="float16"),
    "blockrows_wgrad_fp16": BlockRowsWgrad(S=10, Mx=4, My=1, kb=16, n_rows=24, K=48, k=24, dtype="float16"),
    "blockrows_wgrad_fp32": BlockRowsWgrad(S=10, Mx=4, My=8, kb=2, n_rows=24, K=48, k=None, dtype="float32"),
}
ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def built(tvm, nvcc, tmp_path_factory):
    return build_all(SPECS, ARCHS, tmp_path_factory)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [n for n in SPECS if "fp32" not in n])
def test_blockrows_tensor_core_sass(built, name, arch):
    entry, folder = built[name, arch]
    text = _sass(entry, folder)
    hmma = re.findall(r"HMMA\.16816\.F32(\.BF16)?", text)
    assert hmma, f"{name} {arch}: no HMMA.16816.F32 in SASS"
    assert all(bool(b) == (SPECS[name].dtype == "bfloat16") for b in hmma)
    assert "LDSM" in text, f"{name} {arch}: tensor-core operands not loaded with ldmatrix"
    assert entry.spill_bytes == 0, f"{name} {arch}: {entry.spill_bytes} bytes of register spills"


@pytest.mark.parametrize("arch", ARCHS)
def test_blockrows_float32_is_simt(built, arch):
    entry, folder = built["blockrows_wgrad_fp32", arch]
    text = _sass(entry, folder)
    assert "FFMA" in text and "HMMA" not in text


@pytest.mark.parametrize("name", list(SPECS))
def test_blockrows_manifest_entry(built, name):
    entry, folder = built[name, "sm_90"]
    spec = SPECS[name]
    cu = (folder / entry.source).read_text()
    sig = re.search(rf"void (?:__launch_bounds__\((\d+)\) )?{entry.symbol}\(([^)]*)\)", cu)
    names = [re.sub(r"_ptr$", "", a.split()[-1]) for a in sig.group(2).split(",")]
    assert [p.name for p in entry.params] == names
    assert sorted(names) == sorted(n for n, _, _ in spec.params())
    Mp, Np, _ = spec.padded
    assert entry.grid == ((Mp // spec.tile.bm) * (Np // spec.tile.bn), spec.T, 1)
