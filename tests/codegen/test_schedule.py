"""CUDA builds (no GPU needed): every generator schedules, TVM emits CUDA, nvcc compiles it for
sm_80 and sm_90, and the SASS holds the tensor-core instructions (HMMA) fed by ldmatrix (LDSM),
without register spills; the float32 schedule uses FFMA and no tensor cores."""
import re

import pytest

from rnn_sparsify.codegen.gemm_gather import GatherK, GatherKN, WgradT

pytestmark = pytest.mark.tvm

SPECS = {
    "gather_k_bf16": GatherK(T=3, M=20, N=72, K=40, k=18, dtype="bfloat16"),
    "gather_kn_fp16": GatherKN(T=2, M=20, Nw=64, Kw=48, kc=16, kn=24, dtype="float16", P=4),
    "wgrad_t_bf16": WgradT(T=3, B=20, kc=40, K=48, k=24, dtype="bfloat16"),
    "gather_k_fp32": GatherK(T=2, M=20, N=72, K=40, k=18, dtype="float32"),
}
ARCHS = ("sm_80", "sm_90")


def build_all(specs, archs, tmp_path_factory):
    """(name, arch) -> (entry, folder) for every spec and arch, each built in its own folder."""
    from rnn_sparsify.codegen.aot import build_entry, toolchain_versions

    versions = toolchain_versions()
    out = {}
    for name, spec in specs.items():
        for arch in archs:
            folder = tmp_path_factory.mktemp(f"{name}_{arch}")
            out[name, arch] = (build_entry(spec, arch, folder, versions), folder)
    return out


@pytest.fixture(scope="module")
def built(tvm, nvcc, tmp_path_factory):
    """Every representative spec, built once per module."""
    return build_all(SPECS, ARCHS, tmp_path_factory)


def _sass(entry, folder):
    from rnn_sparsify.codegen.errors import ToolchainMissing
    from rnn_sparsify.codegen.toolchain import sass

    try:
        return sass(folder / entry.cubin)
    except ToolchainMissing as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [n for n in SPECS if "fp32" not in n])
def test_tensor_core_sass(built, name, arch):
    entry, folder = built[name, arch]
    text = _sass(entry, folder)
    dtype = SPECS[name].dtype
    hmma = re.findall(r"HMMA\.16816\.F32(\.BF16)?", text)
    assert hmma, f"{name} {arch}: no HMMA.16816.F32 in SASS"
    assert all(bool(b) == (dtype == "bfloat16") for b in hmma), f"{name}: HMMA input type != {dtype}"
    assert "LDSM" in text, f"{name} {arch}: tensor-core operands not loaded with ldmatrix"
    assert entry.spill_bytes == 0, f"{name} {arch}: {entry.spill_bytes} bytes of register spills"
    ptx = (folder / entry.ptx).read_text()
    assert "mma.sync.aligned.m16n8k16" in ptx and f".target {arch}" in ptx


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_schedule_is_simt(built, arch):
    entry, folder = built["gather_k_fp32", arch]
    text = _sass(entry, folder)
    assert "FFMA" in text and "HMMA" not in text
    assert entry.block == (16, 16, 1)


@pytest.mark.parametrize("name", list(SPECS))
def test_manifest_entry_matches_kernel(built, name):
    """Parameter order is the kernel's (TVM sorts buffers by name), not the PrimFunc's; grid
    and block follow the schedule's bindings."""
    entry, folder = built[name, "sm_90"]
    spec = SPECS[name]
    cu = (folder / entry.source).read_text()
    sig = re.search(rf"void (?:__launch_bounds__\((\d+)\) )?{entry.symbol}\(([^)]*)\)", cu)
    names = [re.sub(r"_ptr$", "", a.split()[-1]) for a in sig.group(2).split(",")]
    assert [p.name for p in entry.params] == names
    assert sorted(names) == sorted(n for n, _, _ in spec.params())
    Mp, Np, _ = spec.padded
    assert entry.grid == ((Mp // spec.tile.bm) * (Np // spec.tile.bn), spec.T, 1)
    assert int(sig.group(1)) == entry.block[0] * entry.block[1] * entry.block[2]
    assert entry.symbol.encode() in (folder / entry.cubin).read_bytes()
