"""A table of LSTM models that reproduce why real models do not trace whole with torch.fx.

Each :class:`ModelCase` builds a small model (float64 where the test asks), fresh random
inputs, and states what ``sparsify`` must report for it. Reusable by other test files and
by ``rnn-sparsify inspect tests/models/cases.py:<factory>`` (every ``make_*`` function is a
factory returning ``(model, example_inputs)``).

Failure causes covered (issue 3): packed sequences with unsorted lengths; an ``LSTMCell``
decoder stepped in Python with attention; an ``nn.LSTM`` subclass with its own
``forward(x, lengths)``; hand-written cells (three gate orders, chunk / split / slicing,
nn.Linear / F.linear / mm, one projection on a concatenation); a LayerNorm cell; a
TorchScript submodule; ``proj_size``; bidirectional multi-layer; dropout before an LSTM and
between LSTMs (nn.Dropout and F.dropout).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

B, T = 3, 5  # batch and sequence length of the generated inputs


# ---------------------------------------------------------------------------------------
# models
class PackedTagger(nn.Module):
    """Embedding -> dropout -> pack (unsorted lengths) -> 2-layer biLSTM -> pad -> linear."""

    def __init__(self, vocab=20, emb=6, hidden=8, tags=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.drop = nn.Dropout(0.2)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2, bidirectional=True, batch_first=True, dropout=0.1)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, tokens, lengths):
        x = self.drop(self.emb(tokens))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.size(1))
        return self.out(out)


class AttnSeq2Seq(nn.Module):
    """LSTM encoder + LSTMCell decoder looped in Python over ``range(tgt.size(1))`` with attention."""

    def __init__(self, emb=6, hidden=8, out=5):
        super().__init__()
        self.hidden = hidden
        self.encoder = nn.LSTM(emb, hidden, batch_first=True)
        self.decoder = nn.LSTMCell(emb + hidden, hidden)
        self.attn = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(2 * hidden, out)

    def forward(self, src, tgt):
        enc, (h, c) = self.encoder(src)
        h, c = h[0], c[0]
        ctx = torch.zeros_like(h)
        outs = []
        for t in range(tgt.size(1)):
            h, c = self.decoder(torch.cat([tgt[:, t], ctx], -1), (h, c))
            scores = torch.bmm(enc, self.attn(h).unsqueeze(2)).squeeze(2)
            ctx = torch.bmm(scores.softmax(-1).unsqueeze(1), enc).squeeze(1)
            outs.append(self.out(torch.cat([h, ctx], -1)))
        return torch.stack(outs, 1)


class LengthAwareLSTM(nn.LSTM):
    """An nn.LSTM subclass with its own ``forward(x, lengths=None)`` calling ``super().forward``."""

    def forward(self, x, lengths=None):
        if lengths is None:
            return super().forward(x)[0]
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=self.batch_first, enforce_sorted=False)
        out, _ = super().forward(packed)
        return pad_packed_sequence(out, batch_first=self.batch_first, total_length=x.size(1))[0]


class SubclassModel(nn.Module):
    def __init__(self, emb=6, hidden=8):
        super().__init__()
        self.rnn = LengthAwareLSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x, lengths):
        return self.head(self.rnn(x, lengths))


class ExplicitBaseLSTM(nn.LSTM):
    """Calls ``nn.LSTM.forward(self, ...)`` by name: cannot reach the sparse implementation."""

    def forward(self, x):
        return nn.LSTM.forward(self, x)[0]


class ExplicitBaseModel(nn.Module):
    def __init__(self, emb=6, hidden=8):
        super().__init__()
        self.rnn = ExplicitBaseLSTM(emb, hidden)
        self.ok = nn.LSTM(hidden, hidden)

    def forward(self, x):
        return self.ok(self.rnn(x))[0]


class CellIFGO(nn.Module):
    """Two nn.Linear, ``chunk(4, 1)``, gates i f g o, state as a tuple."""

    def __init__(self, inp, hidden):
        super().__init__()
        self.ih = nn.Linear(inp, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden)

    def forward(self, x, state):
        h, c = state
        gates = self.ih(x) + self.hh(h)
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, c


class CellCatFIOG(nn.Module):
    """One nn.Linear on ``cat([x, h])``, ``torch.split(H)``, gates f i o g, Tensor methods."""

    def __init__(self, inp, hidden):
        super().__init__()
        self.hidden = hidden
        self.W = nn.Linear(inp + hidden, 4 * hidden)

    def forward(self, x, h, c):
        z = self.W(torch.cat([x, h], dim=1))
        f, i, o, g = torch.split(z, self.hidden, dim=1)
        c2 = f.sigmoid() * c + i.sigmoid() * g.tanh()
        return o.sigmoid() * c2.tanh(), c2


class CellSliceGIFO(nn.Module):
    """Raw parameters, ``F.linear``, one shared bias, gates by slicing in order g i f o,
    operands of ``*``/``+`` swapped, nn.Sigmoid modules."""

    def __init__(self, inp, hidden):
        super().__init__()
        self.H = hidden
        self.w_x = nn.Parameter(torch.randn(4 * hidden, inp) / inp ** 0.5)
        self.w_h = nn.Parameter(torch.randn(4 * hidden, hidden) / hidden ** 0.5)
        self.b = nn.Parameter(torch.randn(4 * hidden) * 0.1)
        self.act = nn.Sigmoid()

    def forward(self, x, hc):
        h, c = hc
        H = self.H
        z = F.linear(x, self.w_x, self.b) + F.linear(h, self.w_h)
        g = torch.tanh(z[:, :H])
        i = self.act(z[:, H:2 * H])
        f = self.act(z[:, 2 * H:3 * H])
        o = self.act(z[:, 3 * H:])
        c = i * g + c * f
        return o * torch.tanh(c), c


class LayerNormCell(nn.Module):
    """LayerNorm LSTM cell as in PyTorch's benchmarks (custom_lstms.py): ``mm`` with
    transposed parameters, LayerNorm on both projections and on the cell state."""

    def __init__(self, inp, hidden):
        super().__init__()
        self.weight_ih = nn.Parameter(torch.randn(4 * hidden, inp) / inp ** 0.5)
        self.weight_hh = nn.Parameter(torch.randn(4 * hidden, hidden) / hidden ** 0.5)
        self.layernorm_i = nn.LayerNorm(4 * hidden)
        self.layernorm_h = nn.LayerNorm(4 * hidden)
        self.layernorm_c = nn.LayerNorm(hidden)

    def forward(self, input, state):
        hx, cx = state
        igates = self.layernorm_i(torch.mm(input, self.weight_ih.t()))
        hgates = self.layernorm_h(torch.mm(hx, self.weight_hh.t()))
        gates = igates + hgates
        ingate, forgetgate, cellgate, outgate = gates.chunk(4, 1)
        ingate = torch.sigmoid(ingate)
        forgetgate = torch.sigmoid(forgetgate)
        cellgate = torch.tanh(cellgate)
        outgate = torch.sigmoid(outgate)
        cy = self.layernorm_c((forgetgate * cx) + (ingate * cellgate))
        hy = outgate * torch.tanh(cy)
        return hy, (hy, cy)


class LoopedCellRNN(nn.Module):
    """Runs a hand-written cell over time in Python (``range(x.size(0))``: not traceable)."""

    def __init__(self, cell_cls, inp=6, hidden=8, out=3):
        super().__init__()
        self.hidden = hidden
        self.cell = cell_cls(inp, hidden)
        self.head = nn.Linear(hidden, out)
        self.style = {CellIFGO: "tuple", CellCatFIOG: "flat", CellSliceGIFO: "tuple", LayerNormCell: "nested"}[cell_cls]

    def forward(self, x):  # x: (T, B, inp)
        h = x.new_zeros(x.size(1), self.hidden)
        c = x.new_zeros(x.size(1), self.hidden)
        outs = []
        for t in range(x.size(0)):
            if self.style == "flat":
                h, c = self.cell(x[t], h, c)
            elif self.style == "nested":
                _, (h, c) = self.cell(x[t], (h, c))
            else:
                h, c = self.cell(x[t], (h, c))
            outs.append(h)
        return self.head(torch.stack(outs))


class CellLoopEncoder(nn.Module):
    """An LSTMCell stepped over time; scripted by :class:`ScriptedEncoder`."""

    def __init__(self, emb: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.LSTMCell(emb, hidden)

    def forward(self, x):
        h = torch.zeros(x.size(1), self.hidden, dtype=x.dtype, device=x.device)
        c = torch.zeros_like(h)
        outs: List[torch.Tensor] = []
        for t in range(x.size(0)):
            h, c = self.cell(x[t], (h, c))
            outs.append(h)
        return torch.stack(outs)


class ScriptedEncoder(nn.Module):
    """A TorchScript submodule (holding an LSTMCell) next to an eager nn.LSTM."""

    def __init__(self, emb=6, hidden=8):
        super().__init__()
        self.enc = torch.jit.script(CellLoopEncoder(emb, hidden))
        self.dec = nn.LSTM(hidden, hidden)

    def forward(self, x):
        y = self.enc(x)
        y, _ = self.dec(y)
        return y


class ProjModel(nn.Module):
    def __init__(self, emb=6, hidden=8, proj=4):
        super().__init__()
        self.lstm = nn.LSTM(emb, hidden, proj_size=proj, batch_first=True)
        self.head = nn.Linear(proj, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


class BiStack(nn.Module):
    def __init__(self, emb=6, hidden=8):
        super().__init__()
        self.lstm = nn.LSTM(emb, hidden, num_layers=3, bidirectional=True, dropout=0.2)
        self.head = nn.Linear(2 * hidden, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y)


class DropoutStack(nn.Module):
    """nn.Dropout before the first LSTM, F.dropout between the two LSTMs (traceable)."""

    def __init__(self, emb=6, hidden=8):
        super().__init__()
        self.drop_in = nn.Dropout(0.25)
        self.lstm1 = nn.LSTM(emb, hidden)
        self.lstm2 = nn.LSTM(hidden, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        y, _ = self.lstm1(self.drop_in(x))
        y = F.dropout(y, 0.3, self.training)
        y, _ = self.lstm2(y)
        return self.head(y)


class NoLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


# ---------------------------------------------------------------------------------------
# factories: (model, example_inputs); inputs are fresh random tensors on every call
def _lengths() -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (B,))
    lengths[torch.randint(0, B, ())] = T  # the longest is the padded length
    return lengths


def make_packed(dtype=torch.float32):
    m = PackedTagger().to(dtype)
    return m, (torch.randint(0, 20, (B, T)), _lengths())


def make_attention(dtype=torch.float32):
    m = AttnSeq2Seq().to(dtype)
    return m, (torch.randn(B, T, 6, dtype=dtype), torch.randn(B, T - 1, 6, dtype=dtype))


def make_subclass(dtype=torch.float32):
    return SubclassModel().to(dtype), (torch.randn(B, T, 6, dtype=dtype), _lengths())


def make_explicit_base(dtype=torch.float32):
    return ExplicitBaseModel().to(dtype), (torch.randn(T, B, 6, dtype=dtype),)


def _looped(cell_cls):
    def make(dtype=torch.float32):
        return LoopedCellRNN(cell_cls).to(dtype), (torch.randn(T, B, 6, dtype=dtype),)

    make.__name__ = f"make_cell_{cell_cls.__name__}"
    return make


make_cell_ifgo = _looped(CellIFGO)
make_cell_cat_fiog = _looped(CellCatFIOG)
make_cell_slice_gifo = _looped(CellSliceGIFO)
make_cell_layernorm = _looped(LayerNormCell)


def make_scripted(dtype=torch.float32):
    return ScriptedEncoder().to(dtype), (torch.randn(T, B, 6, dtype=dtype),)


def make_proj(dtype=torch.float32):
    return ProjModel().to(dtype), (torch.randn(B, T, 6, dtype=dtype),)


def make_bistack(dtype=torch.float32):
    return BiStack().to(dtype), (torch.randn(T, B, 6, dtype=dtype),)


def make_dropout_stack(dtype=torch.float32):
    return DropoutStack().to(dtype), (torch.randn(T, B, 6, dtype=dtype),)


def make_no_lstm(dtype=torch.float32):
    return NoLSTM().to(dtype), (torch.randn(2, 4, dtype=dtype),)


def make_raises():
    raise RuntimeError("factory failed on purpose")


# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    """One LSTM the report must list: name, kind (prefix), handling, words the reason has."""

    fqn: str
    kind: str
    handling: str
    reason_has: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelCase:
    name: str
    factory: Callable
    expected: tuple[Expect, ...]
    rewritten: tuple[str, ...] = ()  # modules whose forward is replaced (graph rewrite)
    untraceable: tuple[str, ...] = ()  # modules that must be reported as untraceable
    fused: tuple[str, ...] = ()  # LSTMs that receive a fused dropout
    notes: str = ""


SWAP, REWRITE, SKIP = "module swap", "graph rewrite", "skipped"

CASES: tuple[ModelCase, ...] = (
    ModelCase("packed_unsorted", make_packed,
              (Expect("lstm", "nn.LSTM", SWAP, ("untraceable",)),), untraceable=("",)),
    ModelCase("lstmcell_attention", make_attention,
              (Expect("encoder", "nn.LSTM", SWAP), Expect("decoder", "nn.LSTMCell", SWAP, ("untraceable",))),
              untraceable=("",)),
    ModelCase("lstm_subclass_forward", make_subclass,
              (Expect("rnn", "nn.LSTM subclass LengthAwareLSTM", SWAP, ("traced graph",)),)),
    ModelCase("lstm_subclass_explicit_base", make_explicit_base,
              (Expect("rnn", "nn.LSTM subclass ExplicitBaseLSTM", SKIP, ("nn.LSTM.forward(self", "super().forward")),
               Expect("ok", "nn.LSTM", SWAP))),
    ModelCase("cell_ifgo_linear_chunk", make_cell_ifgo,
              (Expect("cell", "hand-written cell", REWRITE, ("gates ifgo",)),), rewritten=("cell",),
              untraceable=("",)),
    ModelCase("cell_fiog_cat_split", make_cell_cat_fiog,
              (Expect("cell", "hand-written cell", REWRITE, ("gates fiog", "h is named 'h'")),),
              rewritten=("cell",), untraceable=("",)),
    ModelCase("cell_gifo_flinear_slices", make_cell_slice_gifo,
              (Expect("cell", "hand-written cell", REWRITE, ("gates gifo",)),), rewritten=("cell",),
              untraceable=("",)),
    ModelCase("cell_layernorm", make_cell_layernorm,
              (Expect("cell", "hand-written cell", REWRITE, ("gate-gradient sparsity not applied", "layernorm_c")),),
              rewritten=("cell",), untraceable=("",)),
    ModelCase("torchscript_submodule", make_scripted,
              (Expect("enc", "TorchScript module", SKIP, ("TorchScript", "sparsify the eager module")),
               Expect("dec", "nn.LSTM", SWAP))),
    ModelCase("proj_size", make_proj, (Expect("lstm", "nn.LSTM", SWAP),)),
    ModelCase("bidirectional_multilayer", make_bistack, (Expect("lstm", "nn.LSTM", SWAP),)),
    ModelCase("dropout_before_and_between", make_dropout_stack,
              (Expect("lstm1", "nn.LSTM", SWAP), Expect("lstm2", "nn.LSTM", SWAP)),
              rewritten=("",), fused=("lstm1", "lstm2")),
)


def case(name: str) -> ModelCase:
    return next(c for c in CASES if c.name == name)
