"""From an LSTM description to the kernel specs it needs (pure Python)."""
import pytest

from rnn_sparsify.codegen.errors import UnsupportedGemm
from rnn_sparsify.codegen.gemm_gather import GatherK, GatherKN, GatherRowsT, WgradT, per_step_tile, rows_tile, sequence_tile
from rnn_sparsify.codegen.lstm_spec import LSTMSpec, kept_gate_columns, specs_from_model


def test_dropout_only_lstm():
    s = LSTMSpec(input_size=512, hidden_size=512, batch=64, seq_len=35, dtype="bf16",
                 structured_dropout={"p_input": 0.5, "p_recurrent": 0.5})
    got = dict((type(sp), []) for _, sp in s.gemms())
    pairs = s.gemms()
    assert ("fwd_input", GatherRowsT(T=35, M=64, N=2048, K=512, k=256, tile=rows_tile(64))) in pairs
    assert ("fwd_recurrent", GatherK(T=1, M=64, N=2048, K=512, k=256,
                                          tile=per_step_tile(64, 2048, 256))) in pairs
    assert ("bwd_data", GatherKN(T=35, M=64, Nw=2048, Kw=512, kc=None, kn=256,
                                 tile=sequence_tile(35, 64, 256, 2048))) in pairs
    assert ("bwd_data", GatherKN(T=1, M=64, Nw=2048, Kw=512, kc=None, kn=256,
                                      tile=per_step_tile(64, 256, 2048))) in pairs
    assert ("wgrad", WgradT(T=35, B=64, kc=2048, K=512, k=256)) in pairs
    # input and hidden sizes equal: the ih and hh weight-gradient GEMMs are one kernel
    assert len(pairs) == 5 and set(got) == {GatherRowsT, GatherK, GatherKN, WgradT}


def test_input_projection_kernel_by_dtype_and_length():
    """Whole-row kernel for 16-bit sequences; GatherK for float32 (SIMT) and one-step specs."""
    base = dict(input_size=40, hidden_size=16, batch=20, structured_dropout={"p_input": 0.5})
    kinds = {(T, dt): [sp.kind for m, sp in LSTMSpec(**base, seq_len=T, dtype=dt).gemms() if m == "fwd_input"]
             for T in (1, 35) for dt in ("bfloat16", "float16", "float32")}
    assert kinds == {(1, "bfloat16"): ["gather_k"], (1, "float16"): ["gather_k"], (1, "float32"): ["gather_k"],
                     (35, "bfloat16"): ["gather_rows_t"], (35, "float16"): ["gather_rows_t"],
                     (35, "float32"): ["gather_k"]}


def test_dense_lstm_needs_no_kernel():
    assert LSTMSpec(input_size=8, hidden_size=8, batch=2, seq_len=3).gemms() == []


def test_gate_sparsity_and_layers():
    s = LSTMSpec(input_size=10, hidden_size=6, batch=4, seq_len=5, num_layers=2, bidirectional=True,
                 gate_sparsity={"mode": "coarse", "P": 4, "R": 3, "S": 1})
    kinds = [(m, sp) for m, sp in s.gemms()]
    # 24 columns = 6 slices of 4 = 2 regions of 3, one slice dropped per region
    assert kept_gate_columns(6, {"mode": "coarse", "P": 4, "R": 3, "S": 1}) == 16
    # layer 1 input = 2H; dnet's kept columns are aligned slices of P = 4: block-indexed rows
    assert ("bwd_data", GatherKN(T=5, M=4, Nw=24, Kw=12, kc=16, kn=None, P=4,
                                 tile=sequence_tile(5, 4, 12, 16))) in kinds
    assert all(sp.P == 4 for m, sp in kinds if m == "bwd_data")
    assert ("wgrad", WgradT(T=5, B=4, kc=16, K=12, k=None)) in kinds  # the wgrad kernel never reads g_cols
    assert all(m != "fwd_input" for m, _ in kinds)


@pytest.mark.parametrize("gate, kept", [({"mode": "meprop", "keep": 0.25}, 10), ({"mode": "fine"}, None), (None, None),
                                        ({"mode": "coarse", "P": 2, "R": 8, "S": 4}, 20)])
def test_kept_gate_columns(gate, kept):
    assert kept_gate_columns(10, gate) == kept


def test_invalid_lstm_spec():
    with pytest.raises(UnsupportedGemm, match="hidden_size"):
        LSTMSpec(input_size=4, hidden_size=0, batch=1, seq_len=1)
    with pytest.raises(UnsupportedGemm, match="dtype"):
        LSTMSpec(input_size=4, hidden_size=4, batch=1, seq_len=1, dtype="int8")


def test_specs_from_model():
    import torch

    from rnn_sparsify import SparseLSTM, StructuredDropout

    model = torch.nn.Sequential(torch.nn.Linear(3, 8), SparseLSTM(8, 16, structured_dropout=StructuredDropout(0.5, 0.25)))
    (spec,) = specs_from_model(model, batch=4, seq_len=7)
    assert spec.name == "1" and spec.dtype == "float32" and spec.structured_dropout["p_recurrent"] == 0.25
    assert ("fwd_recurrent", GatherK(T=1, M=4, N=64, K=16, k=12, dtype="float32",
                                              tile=per_step_tile(4, 64, 12))) in spec.gemms()


def test_fine_gate_sparsity_uses_blockrows_kernels():
    from rnn_sparsify.codegen.gemm_gather import BlockRowsData, BlockRowsWgrad

    s = LSTMSpec(input_size=12, hidden_size=10, batch=20, seq_len=5, dtype="fp16",
                 structured_dropout={"p_input": 0.5}, gate_sparsity={"mode": "fine", "My": 8, "Mx": 4, "K": 1})
    pairs = s.gemms()
    # batch 20 = 3 blocks of 8 (24 padded rows), 2 kept per slice = 16 rows; 40 columns = 10 slices
    assert ("bwd_data_blockrows", BlockRowsData(S=10, Mx=4, My=1, nb=24, kb=16, K=12, k=6, dtype="float16")) in pairs
    assert ("bwd_data_blockrows", BlockRowsData(S=10, Mx=4, My=1, nb=24, kb=16, K=10, k=None, dtype="float16")) in pairs
    assert ("wgrad_blockrows", BlockRowsWgrad(S=10, Mx=4, My=1, kb=16, n_rows=24, K=12, k=6, dtype="float16")) in pairs
    assert {m for m, _ in pairs} == {"fwd_input", "bwd_data_blockrows", "wgrad_blockrows"}
    # K >= blocks per slice: the config cannot run at this batch, no specs for it
    bad = LSTMSpec(input_size=12, hidden_size=10, batch=8, seq_len=5, gate_sparsity={"mode": "fine", "My": 8, "K": 1})
    assert bad.gemms() == []


def test_meprop_columns_are_not_blocks():
    s = LSTMSpec(input_size=8, hidden_size=8, batch=4, seq_len=3, gate_sparsity={"mode": "meprop", "keep": 0.5})
    assert all(sp.P == 1 for m, sp in s.gemms() if m == "bwd_data")
