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


_MODEL = (
    "import torch\nfrom torch import nn\n"
    "class Two(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.a = nn.LSTM(12, 24, num_layers=2)\n"
    "        self.b = nn.LSTM(24, 40, bidirectional=True)\n"
    "    def forward(self, x):\n"
    "        return self.b(self.a(x)[0])[0]\n"
    "def make():\n"
    "    torch.manual_seed(0)\n"
    "    return Two()\n")


@pytest.mark.tvm
@pytest.mark.slow  # ~20 s: the per-step kernels of both LSTMs are built too
def test_compile_persistent_train_model(tvm, nvcc, tmp_path, capsys):
    """``--model --persistent-train``: one request per distinct LSTM shape of the model, with the
    flags' kept count and coarse selection, in the dtype the GEMM kernels were built for."""
    from rnn_sparsify.codegen.manifest import Manifest
    from rnn_sparsify.config import kept_count

    (tmp_path / "m.py").write_text(_MODEL)
    rc = cli.main(["compile", "-q", "-o", str(tmp_path / "b"), "--arch", "sm_90", "--model",
                   f"{tmp_path / 'm.py'}:make", "--batch", "4", "--seq-len", "3", "--p-recurrent", "0.65",
                   "--gate", "coarse:P=4,R=8,S=4", "--persistent-train", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0, out
    kernels = Manifest.load(tmp_path / "b").kernels
    ents = [e for e in kernels if e.spec["kind"].startswith("persistent_train")]
    got = sorted((e.spec["hidden_size"], e.spec["part"], e.spec["keep"], tuple(e.spec.get("coarse") or ()))
                 for e in ents)
    want = sorted((H, part, kept_count(H, 0.65), (4, 8, 4) if part == "bwd" else ())
                  for H in (24, 40) for part in ("fwd", "bwd"))
    assert got == want  # 2 layers of a and both directions of b share their LSTM's two kernels
    gemm_dtypes = {e.spec["dtype"] for e in kernels if not e.spec["kind"].startswith("persistent")}
    assert {e.spec["dtype"] for e in ents} == gemm_dtypes and len(gemm_dtypes) == 1
    assert {e.launch for e in ents} == {"cooperative"} and {e.spec["batch"] for e in ents} == {4}
    assert "persistent training fwd kernel sm_90: hidden 40, batch 4" in out


def test_compile_persistent_train_model_fine_only_refused(tmp_path, capsys):
    (tmp_path / "m.py").write_text(_MODEL)
    rc = cli.main(["compile", "-q", "-o", str(tmp_path / "b"), "--arch", "sm_90", "--model",
                   f"{tmp_path / 'm.py'}:make", "--batch", "8", "--seq-len", "3", "--gate", "fine:My=4,Mx=8,K=1",
                   "--persistent-train", "--cache-dir", str(tmp_path / "cache")])
    cap = capsys.readouterr()
    assert rc == 2, cap
    assert "no LSTM of the model can use the persistent training loops" in cap.err
    assert "fine gate sparsity is not fused" in cap.err
    assert not (tmp_path / "b" / "manifest.json").exists()  # nothing half-built
