"""SparseLSTM / SparseLSTMCell as drop-ins for nn.LSTM / nn.LSTMCell."""
from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnn_sparsify import GateGradientSparsity, SparseLSTM, SparseLSTMCell, StructuredDropout

F64 = torch.float64
SD = StructuredDropout(0.5, 0.5)
GG = GateGradientSparsity.coarse(P=2, R=4, S=2)

TABLE = [
    dict(num_layers=nl, bidirectional=bi, batch_first=bf, proj_size=ps, bias=b)
    for nl, bi, bf, ps, b in itertools.product([1, 2], [False, True], [False, True], [0, 3], [True, False])
    if not (bf and b is False)  # keep the table at 24 rows: batch_first x no-bias adds nothing
]


def _inputs(kw, packed, unbatched, with_h0, gen):
    T, B, I, H = 6, 4, 5, 8
    D = 2 if kw["bidirectional"] else 1
    Hout = kw["proj_size"] or H
    if unbatched:
        x = torch.randn(T, I, dtype=F64, generator=gen)
        hx = (torch.randn(kw["num_layers"] * D, Hout, dtype=F64, generator=gen),
              torch.randn(kw["num_layers"] * D, H, dtype=F64, generator=gen)) if with_h0 else None
        return x, hx
    x = torch.randn(B, T, I, dtype=F64, generator=gen) if kw["batch_first"] else torch.randn(T, B, I, dtype=F64, generator=gen)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([3, 6, 1, 5]), batch_first=kw["batch_first"], enforce_sorted=False)
    hx = (torch.randn(kw["num_layers"] * D, B, Hout, dtype=F64, generator=gen),
          torch.randn(kw["num_layers"] * D, B, H, dtype=F64, generator=gen)) if with_h0 else None
    return x, hx


def _flat(out):
    y, (h, c) = out
    if isinstance(y, nn.utils.rnn.PackedSequence):
        y = y.data
    return y, h, c


@pytest.mark.parametrize("kw", TABLE, ids=lambda k: "-".join(f"{a}{int(v)}" for a, v in k.items()))
@pytest.mark.parametrize("mode", ["padded", "packed", "unbatched"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0none", "h0"])
def test_eval_equals_nn_lstm(kw, mode, with_h0):
    gen = torch.Generator().manual_seed(hash((str(kw), mode, with_h0)) % 2**31)
    torch.manual_seed(gen.initial_seed())
    ref = nn.LSTM(5, 8, dtype=F64, **kw).eval()
    mod = SparseLSTM.from_dense(ref, structured_dropout=SD, gate_sparsity=GG).eval()
    x, hx = _inputs(kw, mode == "packed", mode == "unbatched", with_h0, gen)
    want = _flat(ref(x, hx))
    got = _flat(mod(x, hx))
    assert mod.last_path == "dense"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the sparse Functions compute the same function (no dropout in eval, nothing to drop)
    mod.force_sparse_path = True
    mod.train()
    mod.structured_dropout = None
    with torch.no_grad():
        got = _flat(mod(x, hx))
    assert mod.last_path == "sparse"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_cell_eval_and_p0_equal_nn_lstmcell(bias, unbatched, with_h0):
    torch.manual_seed(11)
    ref = nn.LSTMCell(5, 7, bias=bias, dtype=F64)
    cell = SparseLSTMCell.from_dense(ref, structured_dropout=SD, gate_sparsity=GG).eval()
    x = torch.randn(5, dtype=F64) if unbatched else torch.randn(3, 5, dtype=F64)
    shape = (7,) if unbatched else (3, 7)
    hx = (torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)) if with_h0 else None
    for a, b in zip(cell(x, hx), ref(x, hx)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # sparse path, p = 0, no gate sparsity: forward and gradients equal nn.LSTMCell's
    cell = SparseLSTMCell.from_dense(ref)
    cell.force_sparse_path = True
    res = []
    for m in (ref, cell):
        xx = x.clone().requires_grad_()
        h, c = m(xx, hx)
        (h.pow(2).sum() + c.sum()).backward()
        res.append([h, c, xx.grad] + [p.grad for p in m.parameters()])
    assert cell.last_path == "sparse"
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_state_dict_keys_and_shapes_identical_both_ways():
    ref = nn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3)
    mod = SparseLSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3, structured_dropout=SD)
    sd_ref, sd_mod = ref.state_dict(), mod.state_dict()
    assert list(sd_ref) == list(sd_mod)
    assert all(sd_ref[k].shape == sd_mod[k].shape for k in sd_ref)
    mod.load_state_dict(sd_ref)
    ref2 = nn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3)
    ref2.load_state_dict(mod.state_dict())
    for k in sd_ref:
        assert torch.equal(ref2.state_dict()[k], sd_ref[k])
    cell, rcell = SparseLSTMCell(4, 6), nn.LSTMCell(4, 6)
    cell.load_state_dict(rcell.state_dict())
    rcell.load_state_dict(cell.state_dict())
    assert list(cell.state_dict()) == list(rcell.state_dict())


def test_from_dense_copies_and_to_dense_round_trips():
    ref = nn.LSTM(5, 8, num_layers=2, dropout=0.2, batch_first=True)
    mod = SparseLSTM.from_dense(ref, gate_sparsity=GG)
    assert isinstance(mod, nn.LSTM) and mod.dropout == 0.2 and mod.batch_first
    with torch.no_grad():
        mod.weight_ih_l0.add_(1.0)
    assert not torch.equal(mod.weight_ih_l0, ref.weight_ih_l0)  # a copy, not shared
    back = mod.to_dense()
    assert type(back) is nn.LSTM and back.dropout == 0.2
    assert torch.equal(back.weight_ih_l0, mod.weight_ih_l0)
    # NR structured dropout replaces nn.LSTM's inter-layer dropout
    assert SparseLSTM.from_dense(ref, structured_dropout=StructuredDropout(0.3)).dropout == 0.0
    with pytest.raises(TypeError):
        SparseLSTM.from_dense(nn.GRU(3, 4))


def test_torch_save_load_round_trip():
    mod = SparseLSTM(4, 8, structured_dropout=SD, gate_sparsity=GG)
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.structured_dropout == SD and back.gate_sparsity == GG
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(back.eval()(x)[0], mod.eval()(x)[0])


def test_training_paths_and_phase_switch():
    mod = SparseLSTM(4, 8, num_layers=2, dropout=0.5, gate_sparsity=GG)
    x = torch.randn(5, 3, 4)
    mod(x)[0].sum().backward()
    assert mod.last_path == "sparse"
    mod.set_gate_sparsity_phase(False)  # dense phase, nothing sparse left: cuDNN/ATen path
    mod(x)[0].sum().backward()
    assert mod.last_path == "dense" and mod.active_gate_sparsity is None
    plain = SparseLSTM(4, 8)
    plain(x)
    assert plain.last_path == "dense"


def test_nn_lstm_dropout_on_sparse_path_is_elementwise_between_layers():
    torch.manual_seed(0)
    mod = SparseLSTM(4, 8, num_layers=2, dropout=0.999999, dtype=F64)
    mod.force_sparse_path = True
    ref = mod.to_dense()
    ref.dropout = 0.0
    x = torch.randn(5, 3, 4, dtype=F64)
    y_sparse, _ = mod(x)
    # with the layer-2 input dropped entirely, layer 2 sees zeros: compare to layer 2 alone
    zeros_in = nn.LSTM(16 // 2, 8, dtype=F64)
    zeros_in.load_state_dict({k.replace("_l1", "_l0"): v for k, v in mod.state_dict().items() if "_l1" in k})
    y_ref, _ = zeros_in(torch.zeros(5, 3, 8, dtype=F64))
    torch.testing.assert_close(y_sparse, y_ref)


def test_input_errors_match_nn_lstm():
    mod = SparseLSTM(4, 8, gate_sparsity=GG)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        mod(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="2D or 3D"):
        mod(torch.randn(3))
    cell = SparseLSTMCell(4, 8, gate_sparsity=GG)
    with pytest.raises(ValueError, match="1D or 2D"):
        cell(torch.randn(1, 2, 4))
