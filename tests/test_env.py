"""rnn-sparsify env: CPU vector ISA from /proc/cpuinfo, backend choice per LSTM."""
from __future__ import annotations

import torch

from rnn_sparsify.cli import backend_choice, cpu_vector_isa, env_report


def test_cpu_vector_isa_reads_the_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw\n")
    assert cpu_vector_isa(str(x86)) == ["avx512f", "avx512bw", "avx2", "fma", "avx", "sse4_2"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\n")
    assert cpu_vector_isa(str(arm)) == ["sve", "neon", "bf16"]
    assert cpu_vector_isa(str(tmp_path / "missing")) == []


def test_backend_choice_names_the_backend_and_why():
    name, why = backend_choice("cpu", torch.float32)
    from rnn_sparsify.kernels import select_backend

    assert name == select_backend(torch.device("cpu"), torch.float32).name
    assert why and "cpu" in why


def test_env_report_lists_each_lstm():
    text = env_report("tests/models/cases.py:make_attention")
    assert "encoder (nn.LSTM, float32) on cpu:" in text and "decoder (nn.LSTMCell, float32) on cpu:" in text
