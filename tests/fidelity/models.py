"""Reproductions of issue 12 (fidelity): models whose surroundings ``sparsify`` used to change.

Every ``make_*`` returns ``(model, inputs)`` with fresh random float64 inputs, like
``tests/models/cases.py``; :data:`FIDELITY_CASES` lists them for the invariant table of
``test_invariants.py``.
"""
from __future__ import annotations

from abc import ABC

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

T, B, I, H = 5, 3, 6, 8


def _x():
    return torch.randn(T, B, I, dtype=torch.float64)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H)
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def make_frozen():
    """Item 1: an LSTM frozen by the user stays frozen."""
    m = Encoder().double()
    m.lstm.requires_grad_(False)
    return m, (_x(),)


def double_output(module, args, out):  # module level: the model stays picklable
    return out[0] * 2, out[1]


def make_hooked():
    """Item 2: a forward hook on the LSTM (doubles its output) still runs."""
    m = Encoder().double()
    m.lstm.register_forward_hook(double_output)
    return m, (_x(),)


class ScaledOutput(nn.Module):
    """Item 2: a custom attribute on the LSTM, read by the forward."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H)
        self.lstm.out_scale = 0.5

    def forward(self, x):
        return self.lstm(x)[0] * self.lstm.out_scale


def make_custom_attribute():
    return ScaledOutput().double(), (_x(),)


class Tied(nn.Module):
    """Item 2: the LSTM's input weight is the weight of another module."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(I, 4 * H, bias=False)
        self.lstm = nn.LSTM(I, H)
        self.lstm.weight_ih_l0 = self.proj.weight
        self.head = nn.Linear(4 * H + H, 3)

    def forward(self, x):
        return self.head(torch.cat([self.proj(x), self.lstm(x)[0]], -1))


def make_tied():
    return Tied().double(), (_x(),)


class ListAlias(nn.Module):
    """Item 2: the LSTM is also held in a plain Python list, and called through it."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H)
        self.stack = [self.lstm]

    def forward(self, x):
        return self.stack[0](x)[0]


def make_list_alias():
    return ListAlias().double(), (_x(),)


class ExplicitCall(nn.Module):
    """Item 2: ``nn.LSTM.forward(self.lstm, x)`` names the dense implementation."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H)

    def forward(self, x):
        return nn.LSTM.forward(self.lstm, x)[0]


def make_explicit_call():
    return ExplicitCall().double(), (_x(),)


class DisabledDropouts(nn.Module):
    """Item 3: ``training=False`` written in the call (never active), before an LSTM and
    after a hand-written cell (which makes the forward be rewritten under every config)."""

    def __init__(self):
        super().__init__()
        from tests.models.cases import CellIFGO

        self.lstm = nn.LSTM(I, H)
        self.cell = CellIFGO(H, 4)

    def forward(self, x):
        y = self.lstm(F.dropout(x, 0.3, training=False))[0]
        h0 = y.new_zeros(y.shape[1], 4)
        h, c = self.cell(y[-1], (h0, h0))
        return F.dropout(h, 0.5, training=False)


def make_disabled_dropouts():
    return DisabledDropouts().double(), (_x(),)


class AlwaysOnDropout(nn.Module):
    """Item 3: ``F.dropout(h, 0.5)`` (training=True by default) is active in eval() too; a
    dropout before the LSTM makes the forward be rewritten (fused)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.25)
        self.lstm = nn.LSTM(I, H)

    def forward(self, x):
        return F.dropout(self.lstm(self.drop(x))[0], 0.5)


def make_always_on_dropout():
    return AlwaysOnDropout().double(), (_x(),)


class SharedLSTM(nn.Module):
    """Item 4: one LSTM called twice, once after a dropout."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.lstm = nn.LSTM(H, H)

    def forward(self, x):
        y = self.lstm(self.drop(x))[0]
        return self.lstm(y)[0]


def make_shared():
    return SharedLSTM().double(), (torch.randn(T, B, H, dtype=torch.float64),)


class Counting(nn.Module):
    """Item 5: the forward counts its calls (Python state); a dropout before the LSTM would
    make it a rewrite candidate."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.drop = nn.Dropout(0.2)
        self.lstm = nn.LSTM(I, H)

    def forward(self, x):
        self.calls += 1
        return self.lstm(self.drop(x))[0]


def make_counting():
    return Counting().double(), (_x(),)


class Flagged(nn.Module):
    """Item 5: a flag attribute read by an ``if`` in a traced (rewritten) forward."""

    def __init__(self):
        super().__init__()
        self.use_head = True
        self.drop = nn.Dropout(0.2)
        self.lstm = nn.LSTM(I, H)
        self.head = nn.Linear(H, H)

    def forward(self, x):
        y = self.lstm(self.drop(x))[0]
        if self.use_head:
            y = self.head(y)
        return y


def make_flagged():
    return Flagged().double(), (_x(),)


class OptionalState(nn.Module):
    """Issue 10 item 1: a traced forward with ``if hx is None`` called both ways."""

    def __init__(self):
        super().__init__()
        self.cells = nn.ModuleList([nn.LSTMCell(H, H), nn.LSTMCell(H, H)])
        self.drop = nn.Dropout(0.1)

    def forward(self, x, hx=None):
        if hx is None:
            hx = (x.new_zeros(2, x.shape[0], H), x.new_zeros(2, x.shape[0], H))
        h, c = self.cells[0](x, (hx[0][0], hx[1][0]))
        h2, c2 = self.cells[1](self.drop(h), (hx[0][1], hx[1][1]))
        return h2, (torch.stack([h, h2]), torch.stack([c, c2]))


class StepLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = OptionalState()

    def forward(self, xs):
        out, hx = [], None
        for x in xs.unbind(0):
            h, hx = self.rnn(x, hx)
            out.append(h)
        return torch.stack(out)


def make_optional_state():
    return StepLoop().double(), (torch.randn(T, B, H, dtype=torch.float64),)


# issue 10, item 2: subclasses the swap must re-class ------------------------------------
class RNNMixin(ABC, nn.RNNBase):
    """An abstract mixin on nn.RNNBase, as speech/forecasting toolkits write them."""

    def describe(self) -> str:
        return f"{type(self).__name__}({self.input_size}->{self.hidden_size})"


class MixinLSTM(RNNMixin, nn.LSTM):
    def forward(self, x, lengths=None):
        if lengths is None:
            return super().forward(x)[0]
        packed = pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
        return pad_packed_sequence(super().forward(packed)[0], batch_first=self.batch_first, total_length=x.size(1))[0]


class SlottedLSTM(nn.LSTM):
    __slots__ = ("tag",)

    def forward(self, x):
        return super().forward(x)[0]


class SubclassZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = MixinLSTM(I, H, batch_first=True)
        self.b = SlottedLSTM(H, H, batch_first=True)
        self.b.tag = "kept"

    def forward(self, x, lengths):
        return self.b(self.a(x, lengths))


def make_subclass_zoo():
    return SubclassZoo().double(), (torch.randn(B, T, I, dtype=torch.float64), torch.tensor([T, 2, 4]))


FIDELITY_CASES = {
    "frozen": make_frozen,
    "hooked": make_hooked,
    "custom_attribute": make_custom_attribute,
    "tied": make_tied,
    "list_alias": make_list_alias,
    "explicit_call": make_explicit_call,
    "disabled_dropouts": make_disabled_dropouts,
    "always_on_dropout": make_always_on_dropout,
    "shared": make_shared,
    "counting": make_counting,
    "flagged": make_flagged,
    "optional_state": make_optional_state,
    "subclass_zoo": make_subclass_zoo,
}
