"""Word-level language model with weight-sparse LSTM training (dense | gradual | dst).

Embedding -> 2-layer nn.LSTM -> Linear, truncated BPTT, on the shipped Shakespeare corpus
(``examples/data/shakespeare``). Only the LSTM's input and recurrent weight matrices are made
sparse; the embedding and the decoder stay dense. All three methods run the same number of
optimizer steps on the same batches, so their validation perplexities compare directly.

    python examples/train_weight_sparse_lm.py --method dense
    python examples/train_weight_sparse_lm.py --method gradual --sparsity 0.9
    python examples/train_weight_sparse_lm.py --method dst --sparsity 0.67

Prints the validation perplexity and writes a JSON result (``--out``).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from rnn_sparsify.weight_sparsity import (
    DSTScheduler,
    GradualPruningScheduler,
    WeightSparsity,
    attach_weight_sparsity,
    format_weight_sparsity_stats,
    weight_sparsity_stats,
)

DATA = Path(__file__).resolve().parent / "data" / "shakespeare"


# -- data ---------------------------------------------------------------------------------
def read_words(path: Path) -> list[str]:
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words.extend(line.split())
            words.append("<eos>")
    return words


def build_vocab(words: list[str], size: int) -> dict[str, int]:
    """The ``size - 1`` most frequent training words plus ``<unk>`` (ties: first seen)."""
    counts = collections.Counter(words)
    itos = ["<unk>"] + [w for w, _ in counts.most_common(size - 1) if w != "<unk>"][: size - 1]
    return {w: i for i, w in enumerate(itos)}


def encode(words: list[str], vocab: dict[str, int]) -> torch.Tensor:
    unk = vocab["<unk>"]
    return torch.tensor([vocab.get(w, unk) for w in words], dtype=torch.long)


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    n = ids.numel() // batch
    return ids[: n * batch].view(batch, n).t().contiguous()  # (T, B)


# -- model --------------------------------------------------------------------------------
class WordLM(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(self.drop(self.embed(x)), hidden)
        return self.decoder(self.drop(out)), hidden


def detach(hidden):
    return tuple(h.detach() for h in hidden)


@torch.no_grad()
def evaluate(model: WordLM, data: torch.Tensor, bptt: int) -> float:
    model.eval()
    loss_sum, n_tok, hidden = 0.0, 0, None
    for i in range(0, data.size(0) - 1, bptt):
        x = data[i : i + bptt]
        y = data[i + 1 : i + 1 + x.size(0)]
        x = x[: y.size(0)]
        logits, hidden = model(x, hidden)
        loss_sum += nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        n_tok += y.numel()
    model.train()
    return loss_sum / n_tok


# -- main ---------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("dense", "gradual", "dst"), default="dense")
    ap.add_argument("--sparsity", type=float, default=None, help="target sparsity (default: gradual 0.9, dst 0.67)")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps (equal for all methods)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--emb", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--freq", type=int, default=50, help="gradual: mask update frequency")
    ap.add_argument("--update-every", type=int, default=50, help="dst: prune/regrow period")
    ap.add_argument("--prune-rate", type=float, default=0.5, help="dst: initial prune rate p_0")
    ap.add_argument("--init", choices=("uniform", "erdos_renyi"), default="uniform", help="dst topology")
    ap.add_argument("--block", type=int, nargs=2, default=(1, 1), metavar=("ROWS", "COLS"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=None, help="JSON result path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_words = read_words(args.data / "train.txt")
    vocab = build_vocab(train_words, args.vocab)
    train = batchify(encode(train_words, vocab), args.batch)
    valid = batchify(encode(read_words(args.data / "valid.txt"), vocab), 10)

    model = WordLM(len(vocab), args.emb, args.hidden, args.layers, args.dropout)
    steps_per_epoch = (train.size(0) - 1) // args.bptt
    sched = None
    if args.method == "gradual":
        cfg = WeightSparsity.gradual(
            args.steps, args.sparsity if args.sparsity is not None else 0.9,
            freq=args.freq, block=tuple(args.block),
        )
    elif args.method == "dst":
        cfg = WeightSparsity.dst(
            args.steps, args.sparsity if args.sparsity is not None else 0.67,
            init=args.init, update_every=args.update_every, prune_rate=args.prune_rate,
            block=tuple(args.block), seed=args.seed,
        )
    if args.method != "dense":
        # sparsify(model, cfg) does the same for every LSTM of a model.
        attach_weight_sparsity(model.rnn, cfg, name="rnn")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    if args.method == "gradual":
        sched = GradualPruningScheduler(model, opt)
    elif args.method == "dst":
        sched = DSTScheduler(model, opt)

    t0 = time.time()
    hidden, pos, avg = None, 0, None
    model.train()
    for step in range(1, args.steps + 1):
        if pos + 1 + args.bptt > train.size(0):
            pos, hidden = 0, None
        x, y = train[pos : pos + args.bptt], train[pos + 1 : pos + 1 + args.bptt]
        pos += args.bptt
        hidden = detach(hidden) if hidden is not None else None
        logits, hidden = model(x, hidden)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if sched is not None:
            sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps:
            sp = f" lstm sparsity {sched.sparsity():.3f}" if sched is not None else ""
            print(f"step {step:5d}/{args.steps} train ppl {math.exp(avg):8.2f}{sp} ({time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0

    val_loss = evaluate(model, valid, args.bptt)
    stats = weight_sparsity_stats(model.rnn)
    print(format_weight_sparsity_stats(stats, "rnn"))
    print(f"{args.method}: validation perplexity {math.exp(val_loss):.2f} after {args.steps} steps ({train_s:.0f}s)")
    result = {
        "method": args.method,
        "val_ppl": math.exp(val_loss),
        "val_loss": val_loss,
        "steps": args.steps,
        "epochs": args.steps / steps_per_epoch,
        "lstm_weight_sparsity": 1.0 - sum(r["nnz"] for r in stats["matrices"]) / sum(r["numel"] for r in stats["matrices"]),
        "lstm_params_ratio": stats["params"]["ratio"],
        "lstm_flops_ratio": stats["flops"]["ratio"],
        "train_seconds": train_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
