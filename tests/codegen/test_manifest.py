"""Manifest round trip and integrity checks (pure Python: no TVM, no GPU)."""
import json

import pytest

from rnn_sparsify.codegen.errors import BundleError
from rnn_sparsify.codegen.gemm_gather import GatherK
from rnn_sparsify.codegen.manifest import KernelEntry, KernelParam, Manifest, content_hash, file_hash, read_verified


def _entry(tmp_path, arch="sm_90"):
    cubin = tmp_path / f"k.{arch}.cubin"
    cubin.write_bytes(b"\x7fELF fake cubin " + arch.encode())
    spec = GatherK(T=2, M=4, N=16, K=8, k=4)
    return KernelEntry(
        key=content_hash({"spec": spec.to_dict(), "arch": arch}), spec=spec.to_dict(), arch=arch,
        symbol=f"{spec.name}_kernel",
        params=(KernelParam("A", "bfloat16"), KernelParam("C", "float32"), KernelParam("W", "bfloat16"),
                KernelParam("idx", "int32")),
        grid=(1, 2, 1), block=(32, 4, 1), dynamic_smem_bytes=0, source="k.cu",
        cubin=cubin.name, cubin_sha256=file_hash(cubin),
    )


def test_round_trip(tmp_path):
    m = Manifest(kernels=(_entry(tmp_path, "sm_80"), _entry(tmp_path)), archs=("sm_80", "sm_90"),
                 toolchain={"tvm": "0.27.0", "nvcc": "13.0"}, lstms=({"input_size": 4},))
    m.save(tmp_path)
    again = Manifest.load(tmp_path)
    assert again == m
    assert json.loads((tmp_path / "manifest.json").read_text())["format"] == "rnn_sparsify.kernel_bundle"


def test_content_hash_is_canonical():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})


def test_hash_mismatch_is_refused(tmp_path):
    e = _entry(tmp_path)
    assert read_verified(tmp_path, e).startswith(b"\x7fELF")
    (tmp_path / e.cubin).write_bytes(b"tampered")
    with pytest.raises(BundleError, match="hash mismatch"):
        read_verified(tmp_path, e)
    (tmp_path / e.cubin).unlink()
    with pytest.raises(BundleError, match="missing"):
        read_verified(tmp_path, e)


@pytest.mark.parametrize(
    "content, match",
    [(None, "no manifest.json"), ("{", "invalid JSON"), ('{"format": "x"}', "not a kernel bundle"),
     ('{"format": "rnn_sparsify.kernel_bundle", "version": 99}', "version 99"),
     ('{"format": "rnn_sparsify.kernel_bundle", "version": 1, "kernels": [{"key": 1}]}', "malformed")],
)
def test_bad_manifests(tmp_path, content, match):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(BundleError, match=match):
        Manifest.load(tmp_path)
