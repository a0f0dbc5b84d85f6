"""``rnn-sparsify compile --persistent-train``: the persistent training loops of an LSTM spec
into a bundle (cooperative entries, the kept count of --p-recurrent, --gate coarse fused)."""
from __future__ import annotations

import pytest

from rnn_sparsify.codegen import cli


@pytest.mark.tvm
@pytest.mark.slow  # ~15 s: the per-step kernels of the spec are built too
def test_compile_persistent_train_spec(tvm, nvcc, tmp_path, capsys):
    from rnn_sparsify.codegen.manifest import Manifest

    rc = cli.main(["compile", "-q", "-o", str(tmp_path / "b"), "--arch", "sm_90", "--input-size", "16",
                   "--hidden-size", "150", "--batch", "4", "--seq-len", "3", "--p-recurrent", "0.65",
                   "--gate", "coarse:P=4,R=8,S=4", "--persistent-train", "--dtype", "bfloat16",
                   "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0, out
    ents = [e for e in Manifest.load(tmp_path / "b").kernels if e.spec["kind"].startswith("persistent_train")]
    assert sorted(e.spec["part"] for e in ents) == ["bwd", "fwd"]
    from rnn_sparsify.config import kept_count

    k = kept_count(150, 0.65)
    assert {e.launch for e in ents} == {"cooperative"} and {e.spec["keep"] for e in ents} == {k}
    assert [e.spec["coarse"] for e in ents if e.spec["part"] == "bwd"] == [[4, 8, 4]]
    assert f"persistent training bwd kernel sm_90: hidden 150, batch 4, {k} kept units/step, coarse 4/8/4" in out
    assert any(not e.spec["kind"].startswith("persistent") for e in Manifest.load(tmp_path / "b").kernels)


def test_compile_persistent_train_option_errors(tmp_path, capsys):
    base = ["compile", "-q", "-o", str(tmp_path / "b"), "--input-size", "8", "--hidden-size", "16",
            "--batch", "2", "--seq-len", "3", "--persistent-train"]
    assert cli.main(base + ["--target", "cpu"]) == 2
    assert "--target cuda" in capsys.readouterr().err
    assert cli.main(base + ["--arch", "sm_90", "--gate", "fine:My=4,Mx=8,K=1", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "coarse gate-gradient selection only" in capsys.readouterr().err
