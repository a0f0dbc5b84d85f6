"""TVM-free loader checks that need no GPU: arch choice/refusal, hashes, driver error checks."""
import pytest
import torch

from rnn_sparsify.codegen.errors import BundleError
from rnn_sparsify.codegen.gemm_gather import GatherK
from rnn_sparsify.codegen.manifest import KernelEntry, KernelParam, Manifest, file_hash
from rnn_sparsify.kernels.cuda_loader import choose_entries


def _manifest(tmp_path, archs, ptx=True):
    entries = []
    for arch in archs:
        for k in (4, 8):
            spec = GatherK(T=1, M=4, N=16, K=16, k=k)
            (tmp_path / f"{k}.{arch}.cubin").write_bytes(f"cubin {arch}".encode())
            entries.append(KernelEntry(
                key=f"{k}{arch}", spec=spec.to_dict(), arch=arch, symbol=f"{spec.name}_kernel",
                params=(KernelParam("A", "bfloat16"),), grid=(1, 1, 1), block=(32, 4, 1), dynamic_smem_bytes=0,
                source="x.cu", cubin=f"{k}.{arch}.cubin", cubin_sha256=file_hash(tmp_path / f"{k}.{arch}.cubin"),
                ptx=f"{k}.{arch}.ptx" if ptx else None, ptx_sha256="0" * 64 if ptx else None))
    return Manifest(kernels=tuple(entries), archs=tuple(archs))


def test_exact_arch_is_chosen(tmp_path):
    m = _manifest(tmp_path, ["sm_80", "sm_90"])
    chosen = choose_entries(m, "sm_90")
    assert len(chosen) == 2 and all(e.arch == "sm_90" and not ptx for e, ptx in chosen)


def test_other_arch_is_refused_with_the_fix(tmp_path):
    m = _manifest(tmp_path, ["sm_80"])
    with pytest.raises(BundleError, match=r"built for \['sm_80'\].*sm_90.*--arch sm_90"):
        choose_entries(m, "sm_90")
    with pytest.raises(BundleError, match="sm_80"):  # PTX of a newer arch never runs on an older GPU
        choose_entries(_manifest(tmp_path, ["sm_90"]), "sm_80", allow_ptx_jit=True)


def test_ptx_jit_is_opt_in(tmp_path):
    m = _manifest(tmp_path, ["sm_80", "sm_86"])
    chosen = choose_entries(m, "sm_90", allow_ptx_jit=True)
    assert len(chosen) == 2 and all(e.arch == "sm_86" and ptx for e, ptx in chosen)
    with pytest.raises(BundleError):
        choose_entries(_manifest(tmp_path, ["sm_80"], ptx=False), "sm_90", allow_ptx_jit=True)


def test_driver_errors_are_raised_with_names():
    cu = pytest.importorskip("cuda.bindings.driver")
    from rnn_sparsify.kernels.cuda_loader import check

    assert check((cu.CUresult.CUDA_SUCCESS, 7)) == 7
    assert check((cu.CUresult.CUDA_SUCCESS,)) is None
    with pytest.raises(BundleError, match="cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE"):
        check((cu.CUresult.CUDA_ERROR_INVALID_IMAGE, None), "cuModuleLoadData")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_backend_is_reference_without_gpu(tmp_path):
    from rnn_sparsify.kernels import select_backend
    from rnn_sparsify.kernels import cuda_backend

    _manifest(tmp_path, ["sm_90"]).save(tmp_path)
    try:
        cuda_backend.use_bundle(tmp_path)
        assert select_backend(torch.device("cpu"), torch.bfloat16).name == "reference"
        assert select_backend(torch.device("cuda"), torch.bfloat16).name == "reference"
    finally:
        cuda_backend.use_bundle(None)


def test_use_bundle_rejects_a_non_bundle(tmp_path):
    from rnn_sparsify.kernels import cuda_backend

    with pytest.raises(BundleError, match="no manifest.json"):
        cuda_backend.use_bundle(tmp_path)
