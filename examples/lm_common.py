"""Word-level language-model plumbing of ``train_lm.py`` (and ``benchmarks/reproduce_papers.py``,
which runs it): corpus and its one tokenisation, batches, model, evaluation, and the sparsity
configs the command line names.

The corpus is the Shakespeare copy shipped in ``examples/data/shakespeare`` (see its README).
"""
from __future__ import annotations

import collections
import math
from pathlib import Path

import torch
from torch import nn

from rnn_sparsify import GateGradientSparsity, WeightSparsity

DATA_DIR = Path(__file__).resolve().parent / "data" / "shakespeare"


class Corpus:
    """Tokenised train/valid/test splits; words outside the ``vocab_size`` most frequent
    training words become ``<unk>``; each line ends with ``<eos>`` (PTB-style)."""

    def __init__(self, data_dir: Path = DATA_DIR, vocab_size: int = 10000):
        data_dir = Path(data_dir)
        if not (data_dir / "train.txt").is_file():
            raise FileNotFoundError(f"no train.txt in {data_dir}")
        train_words = self._words(data_dir / "train.txt")
        counts = collections.Counter(train_words)
        itos = ["<unk>", "<eos>"] + [w for w, _ in counts.most_common(vocab_size - 2) if w not in ("<unk>", "<eos>")]
        self.itos = itos
        self.stoi = {w: i for i, w in enumerate(itos)}
        self.train = self._ids(train_words)
        self.valid = self._ids(self._words(data_dir / "valid.txt"))
        self.test = self._ids(self._words(data_dir / "test.txt"))

    @staticmethod
    def _words(path: Path) -> list[str]:
        out: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            words = line.lower().split()
            if words:
                out.extend(words)
                out.append("<eos>")
        return out

    def _ids(self, words: list[str]) -> torch.Tensor:
        unk = self.stoi["<unk>"]
        return torch.tensor([self.stoi.get(w, unk) for w in words], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.itos)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) -> (N // batch_size, batch_size): each column a contiguous stream."""
    n = ids.numel() // batch_size
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


def bptt_batches(data: torch.Tensor, seq_len: int):
    for i in range(0, data.size(0) - 1, seq_len):
        n = min(seq_len, data.size(0) - 1 - i)
        yield data[i : i + n], data[i + 1 : i + 1 + n]


class WordLM(nn.Module):
    """Embedding -> ``num_layers`` LSTM (a plain ``nn.LSTM``) -> linear decoder (tied weights
    when ``emb == hidden``), with Zaremba-style dropout on the embedding and the LSTM output."""

    def __init__(self, vocab: int, emb: int = 200, hidden: int = 200, num_layers: int = 2, dropout: float = 0.5):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, vocab)
        if emb == hidden:
            self.decoder.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor, state=None):
        out, state = self.lstm(self.drop(self.embed(tokens)), state)
        return self.decoder(self.drop(out)), state


def detach(state):
    return None if state is None else tuple(s.detach() for s in state)


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, seq_len: int, max_batches: int | None = None,
             state=None) -> float:
    """Perplexity of ``model`` on batchified ``data``, starting from ``state`` (None: zeros)."""
    model.eval()
    total, count = 0.0, 0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for b, (x, y) in enumerate(bptt_batches(data, seq_len)):
        if max_batches is not None and b >= max_batches:
            break
        logits, state = model(x, state)
        total += loss_fn(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
        count += y.numel()
    model.train()
    return math.exp(total / max(count, 1))


def make_lm(vocab: int = 10000, batch: int = 20, seq_len: int = 35):
    """Model factory for the command line (``rnn-sparsify inspect examples/lm_common.py:make_lm``):
    the 2-layer language model of ``train_lm.py`` (emb = hidden = 200, its defaults) and one
    batch of example tokens (seq_len x batch)."""
    return WordLM(vocab, 200, 200, num_layers=2, dropout=0.0), (torch.randint(0, vocab, (seq_len, batch)),)


# -- sparsity configs named on the command line ---------------------------------------------
GATE_MODES = ("none", "coarse", "fine", "meprop")
WEIGHT_METHODS = ("none", "gradual", "dst", "static")
DEFAULT_WEIGHT_SPARSITY = {"gradual": 0.9, "dst": 0.67, "static": 0.67}


def gate_config(name: str) -> GateGradientSparsity | None:
    """Gate-gradient sparsity (Zhu et al. 2018) by name; ``"none"``: None."""
    return {
        "none": None,
        "coarse": GateGradientSparsity.coarse(P=4, R=8, S=4),
        "fine": GateGradientSparsity.fine(My=8, Mx=4, K=2),
        "meprop": GateGradientSparsity.meprop(keep=0.5),
    }[name]


def weight_config(method: str, total_steps: int, sparsity: float | None = None, *, init: str = "uniform",
                  freq: int = 50, update_every: int = 50, prune_rate: float = 0.5,
                  block: tuple[int, int] = (1, 1), seed: int = 0) -> WeightSparsity | None:
    """Weight sparsity of the LSTM's input and recurrent matrices by method name:

    * ``gradual``: magnitude pruning to ``sparsity`` (default 0.9) along Narang et al.'s
      schedule, masks updated every ``freq`` steps from 10 % to 50 % of ``total_steps``;
    * ``dst``: dynamic sparse training (ST-RNN) at the fixed ``sparsity`` (default 0.67), topology
      ``init`` (``uniform`` / ``erdos_renyi``), prune and regrow every ``update_every`` steps;
    * ``static``: the same random initial topology as ``dst``, never changed
      (:meth:`WeightSparsity.static`): a static sparse network with the same number of non-zeros;
    * ``none``: None.
    """
    if method == "none":
        return None
    s = DEFAULT_WEIGHT_SPARSITY[method] if sparsity is None else sparsity
    if method == "gradual":
        return WeightSparsity.gradual(total_steps, s, freq=freq, block=tuple(block))
    if method == "dst":
        return WeightSparsity.dst(total_steps, s, init=init, update_every=update_every, prune_rate=prune_rate,
                                  block=tuple(block), seed=seed)
    if method == "static":
        return WeightSparsity.static(total_steps, s, init=init, block=tuple(block), seed=seed)
    raise ValueError(f"unknown weight-sparsity method {method!r}; one of {WEIGHT_METHODS}")
