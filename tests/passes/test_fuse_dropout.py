"""Dropout feeding an LSTM input -> structured NR dropout; the cases that are refused."""
from __future__ import annotations

import torch
from torch import nn

from rnn_sparsify import StructuredDropout, sparsify
from rnn_sparsify.passes.fuse_dropout import find_dropout_feeds, fuse_dropout
from rnn_sparsify.passes.trace import is_lstm_like, trace_module


def _is_lstm(gm):
    return lambda n: n.op == "call_module" and is_lstm_like(gm.get_submodule(n.target))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.lstm = nn.Dropout(0.3), nn.LSTM(4, 4)

    def forward(self, x):
        d = self.drop(x)
        return self.lstm(d)[0] + d  # the dropped tensor is also the residual


class Feature(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.lstm = nn.Dropout1d(0.3), nn.LSTM(4, 4)

    def forward(self, x):
        return self.lstm(self.drop(x))[0]


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.lstm = nn.Dropout(0.3), nn.LSTM(4, 4)

    def forward(self, x):
        return self.lstm(self.drop(x))[0]


def test_fuse_removes_the_node_and_lints():
    gm = trace_module(Plain())
    (feed,), refused = find_dropout_feeds(gm, _is_lstm(gm))
    assert not refused and feed.p == 0.3 and feed.source == "nn.Dropout 'drop'"
    res = fuse_dropout(gm, feed)
    assert res.modified and "drop" not in res.graph_module.code


def test_refusals():
    gm = trace_module(Residual())
    feeds, (r,) = find_dropout_feeds(gm, _is_lstm(gm))
    assert not feeds and "also used by ['add']" in r.reason
    gm = trace_module(Feature())
    feeds, (r,) = find_dropout_feeds(gm, _is_lstm(gm))
    assert not feeds and "Dropout1d 'drop' is not element-wise dropout" in r.reason


def test_sparsify_reports_unfused_dropout_and_keeps_it():
    s = sparsify(Residual(), StructuredDropout(0.0, 0.2))
    rep = s.rnn_sparsify_report
    assert not rep.graph_rewrites and rep.dropouts[0]["fused"] is False
    assert type(s.drop) is nn.Dropout and s.lstm.structured_dropout == StructuredDropout(0.0, 0.2)
    s = sparsify(Plain(), StructuredDropout(0.0, 0.2))
    assert s.lstm.structured_dropout == StructuredDropout(0.3, 0.2)
    x = torch.randn(5, 2, 4)
    s.train()
    s(x).sum().backward()
    assert s.lstm.last_path == "sparse"
