"""`rnn-sparsify compile` says which dtype it built, whether it runs on tensor cores, and what
a float32 model runs under torch.autocast (``model_plan.dtype_note``)."""
import pytest

from rnn_sparsify.codegen import cli
from rnn_sparsify.codegen.model_plan import dtype_note, plan_model

MODEL = (
    "import torch\nfrom torch import nn\n"
    "def make():\n"
    "    return nn.Sequential(nn.LSTM(8, 16){cast})\n"
)


def _note_lines(out):
    return [line for line in out.splitlines() if line.startswith("built ") and "GEMM kernels" in line]


def test_float32_model_without_dtype():
    line = dtype_note(["float32", "float32"], None, ["float32"])
    assert line.startswith("built float32 (SIMT FMA, no tensor cores) GEMM kernels, the model's parameter dtype")
    # what autocast training runs, and that --dtype bfloat16 is for a converted model only
    assert "a float32 input (e.g. from an embedding) runs these float32 kernels" in line
    assert "--dtype bfloat16" in line and "model.to(torch.bfloat16)" in line
    assert "\n" not in line


def test_tensor_core_dtypes():
    line = dtype_note(["bfloat16"], "bfloat16", ["float32"])
    assert line.startswith("built bfloat16 (tensor cores")
    assert "model.to(torch.bfloat16)" in line and "reference torch path" in line
    line = dtype_note(["float16"], None, ["float16"])
    assert "float16 (tensor cores" in line and "autocast" not in line
    assert dtype_note(["bfloat16"], None, []).endswith("(the default for an LSTM spec)")
    assert dtype_note([], None, ["float32"]) == ""  # nothing built, nothing to say


def test_plan_records_the_parameter_dtype():
    import torch
    from torch import nn

    from rnn_sparsify import StructuredDropout

    model = nn.Sequential(nn.LSTM(8, 16)).to(torch.bfloat16)
    plan = plan_model(model, 2, 3, structured_dropout=StructuredDropout(0.0, 0.5))
    assert plan.param_dtypes == ["bfloat16"] and {s.dtype for s in plan.lstms} == {"bfloat16"}


@pytest.mark.tvm
@pytest.mark.parametrize("cast, flags, built, expect", [
    ("", [], "float32", ["no tensor cores", "under torch.autocast", "runs these float32 kernels"]),
    ("", ["--dtype", "bfloat16"], "bfloat16", ["tensor cores", "sparse LSTM runs the reference torch path"]),
    (".to(torch.float16)", [], "float16", ["tensor cores", "the model's parameter dtype (float16)"]),
])
def test_compile_prints_the_dtype(tvm, nvcc, tmp_path, capsys, cast, flags, built, expect):
    from rnn_sparsify.codegen.manifest import Manifest

    (tmp_path / "m.py").write_text(MODEL.format(cast=cast))
    rc = cli.main(["compile", "-q", "-o", str(tmp_path / "b"), "--arch", "sm_90", "--model",
                   f"{tmp_path / 'm.py'}:make", "--batch", "2", "--seq-len", "3", "--p-recurrent", "0.5",
                   "--cache-dir", str(tmp_path / "cache"), *flags])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert {e.spec["dtype"] for e in Manifest.load(tmp_path / "b").kernels} == {built}
    (line,) = _note_lines(out)
    assert line.startswith(f"built {built} (")
    for text in expect:
        assert text in line, line
