"""Weight sparsity across module conversions, config round trips and the inspect report."""
from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from rnn_sparsify import SparseLSTM, SparseLSTMCell, WeightSparsity, attach_weight_sparsity, sparsify


def test_from_dense_carries_masks_and_zeros():
    lstm = nn.LSTM(6, 8, num_layers=2)
    cfg = WeightSparsity.dst(total_steps=100, target_sparsity=0.5)
    attach_weight_sparsity(lstm, cfg, name="lstm")
    sp = SparseLSTM.from_dense(lstm)
    assert sp.weight_sparsity == cfg
    for k, v in lstm.state_dict().items():
        assert torch.equal(sp.state_dict()[k], v), k
    assert torch.equal(sp.weight_hh_l1 == 0, ~sp.weight_hh_l1_mask)
    cell = nn.LSTMCell(4, 8)
    attach_weight_sparsity(cell, cfg, name="cell")
    sc = SparseLSTMCell.from_dense(cell)
    assert torch.equal(sc.weight_ih_mask, cell.weight_ih_mask)


def test_config_from_dict_knows_weight_sparsity_in_a_fresh_process():
    code = (
        "from rnn_sparsify import config_from_dict;"
        "c = config_from_dict({'kind': 'weight_sparsity', 'method': 'dst', 'total_steps': 10, 'target_sparsity': 0.5});"
        "print(type(c).__name__, c.method)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["WeightSparsity", "dst"]


def test_report_table_shows_per_gate_weight_sparsity():
    model = nn.Sequential(nn.LSTM(8, 16))
    sparse = sparsify(model, WeightSparsity.dst(total_steps=100, target_sparsity=0.67))
    text = sparse.rnn_sparsify_report.table()
    assert "weight sparsity dst" in text and "weight_hh_l0" in text and "params" in text
