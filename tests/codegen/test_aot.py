"""AOT compilation into a bundle: manifest, cache (nothing compiled twice), clear errors."""
import builtins

import pytest

from rnn_sparsify.codegen.errors import ToolchainMissing
from rnn_sparsify.codegen.lstm_spec import LSTMSpec

LSTM = LSTMSpec(input_size=40, hidden_size=24, batch=20, seq_len=5, dtype="bfloat16",
                structured_dropout={"p_input": 0.5, "p_recurrent": 0.5})


@pytest.fixture(scope="module")
def bundle(tvm, nvcc, tmp_path_factory):
    from rnn_sparsify.codegen.aot import compile_lstms, compile_specs

    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("bundle")
    manifest = compile_lstms([LSTM], ["sm_90"], out, cache_dir=cache, progress=False)
    return manifest, out, cache, dict(compile_specs.last_stats)


@pytest.mark.tvm
def test_bundle_contents(bundle):
    from rnn_sparsify.codegen.manifest import Manifest, read_verified

    manifest, out, _, stats = bundle
    assert stats == {"kernels": len(LSTM.gemms()), "cache_hits": 0}
    assert Manifest.load(out) == manifest
    assert {e.spec["kind"] for e in manifest.kernels} == {"gather_rows_t", "gather_k", "gather_kn", "wgrad_t"}
    for e in manifest.kernels:
        assert e.arch == "sm_90" and read_verified(out, e) and read_verified(out, e, ptx=True)
        assert (out / e.source).read_text().count(e.symbol) >= 1
    assert manifest.lstms[0]["hidden_size"] == 24 and manifest.toolchain["tvm"].startswith("0.27")


@pytest.mark.tvm
def test_cache_hit_compiles_nothing(bundle, tmp_path, monkeypatch):
    from rnn_sparsify.codegen import aot

    manifest, _, cache, _ = bundle

    def no_build(*a, **k):
        raise AssertionError("a cached kernel was rebuilt")

    monkeypatch.setattr(aot, "build_entry", no_build)
    again = aot.compile_lstms([LSTM], ["sm_90"], tmp_path / "b2", cache_dir=cache, progress=False)
    assert aot.compile_specs.last_stats["cache_hits"] == len(LSTM.gemms())
    assert [e.key for e in again.kernels] == [e.key for e in manifest.kernels]


@pytest.mark.tvm
def test_missing_nvcc_is_a_clear_error(tvm, tmp_path, monkeypatch):
    from rnn_sparsify.codegen import aot, toolchain

    monkeypatch.setattr(toolchain, "cuda_root", lambda: None)
    with pytest.raises(ToolchainMissing, match="nvcc not found"):
        aot.compile_lstms([LSTM], ["sm_90"], tmp_path, progress=False)


def test_missing_tvm_is_a_clear_error(monkeypatch):
    from rnn_sparsify.codegen import toolchain

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "tvm" or name.startswith("tvm."):
            raise ImportError("No module named 'tvm'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ToolchainMissing, match="apache-tvm==0.27.0.post1"):
        toolchain.import_tvm()


def test_bad_arch():
    from rnn_sparsify.codegen.aot import _check_arch
    from rnn_sparsify.codegen.errors import UnsupportedGemm

    with pytest.raises(UnsupportedGemm, match="sm_80 or newer"):
        _check_arch("sm_75")
    with pytest.raises(UnsupportedGemm, match="look like"):
        _check_arch("hopper")
