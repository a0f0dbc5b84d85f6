"""sparsify() needs a config (as torchao's quantize_ does); inspect_model is the dry run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rnn_sparsify import StructuredDropout, inspect_model, sparsify


class KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 4)

    def forward(self, x, scale=None):
        return self.lstm(x)[0] * scale


def test_sparsify_without_config_names_the_configs():
    m = nn.Sequential(nn.LSTM(4, 4))
    with pytest.raises(TypeError) as e:
        sparsify(m)
    msg = str(e.value)
    for word in ("StructuredDropout", "GateGradientSparsity", "WeightSparsity", "inspect_model", "rnn-sparsify inspect"):
        assert word in msg
    assert type(m[0]) is nn.LSTM  # nothing changed
    rep = inspect_model(m)  # the dry run needs no config
    assert rep.lstms[0].fqn == "0" and not rep.applied


def test_example_kwargs_reach_the_forward():
    m = KwModel()
    x = torch.randn(3, 2, 4)
    rep = inspect_model(m, example_inputs=(x,), example_kwargs={"scale": 2.0})
    assert rep["lstm"].observed["tokens"] == 6
    with pytest.raises(ValueError, match="example_inputs do not run"):
        inspect_model(m, example_inputs=(x,))  # scale=None: the forward raises
    s = sparsify(m, StructuredDropout(0.5), example_inputs=(x,), example_kwargs={"scale": 2.0})
    assert s.rnn_sparsify_report["lstm"].observed["calls"] == 1
