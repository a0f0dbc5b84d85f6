"""Train a two-layer word-level LSTM language model with rnn_sparsify's training-time sparsity.

    python examples/train_lm.py                       # built-in default: a short CPU run
    python examples/train_lm.py --gate fine --dropout-in 0.5 --dropout-rec 0.5 --steps 2000
    python examples/train_lm.py --gate none --dropout-in 0 --dropout-rec 0   # dense baseline

The LSTM of the model is a ``SparseLSTM`` with ``StructuredDropout`` (NR + RH, Case III of
Sarma et al.) and ``GateGradientSparsity`` (Zhu et al.); ``--dense-after`` switches the
gate-gradient sparsity off for the final fraction of the steps (the paper's
dense-after-sparse schedule). Prints validation perplexity and writes a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_common import DATA_DIR, Corpus, WordLM, batchify, bptt_batches, detach, evaluate  # noqa: E402

from rnn_sparsify import GateGradientSparsity, SparseLSTM, StructuredDropout  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, but keep the example standalone
    tqdm = None


def gate_config(name: str) -> GateGradientSparsity | None:
    return {
        "none": None,
        "coarse": GateGradientSparsity.coarse(P=4, R=8, S=4),
        "fine": GateGradientSparsity.fine(My=8, Mx=4, K=2),
        "meprop": GateGradientSparsity.meprop(keep=0.5),
    }[name]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--emb", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=200)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--seq", type=int, default=35)
    ap.add_argument("--steps", type=int, default=300, help="training steps (truncated-BPTT batches)")
    ap.add_argument("--lr", type=float, default=20.0)
    ap.add_argument("--clip", type=float, default=0.25)
    ap.add_argument("--dropout-in", type=float, default=0.3, help="structured NR dropout")
    ap.add_argument("--dropout-rec", type=float, default=0.3, help="structured RH dropout")
    ap.add_argument("--gate", choices=["none", "coarse", "fine", "meprop"], default="coarse")
    ap.add_argument("--dense-after", type=float, default=0.25, help="final fraction of steps with dense gate gradients")
    ap.add_argument("--eval-batches", type=int, default=None, help="cap validation batches (None: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    corpus = Corpus(args.data, args.vocab)
    train = batchify(corpus.train, args.batch).to(args.device)
    valid = batchify(corpus.valid, 10).to(args.device)
    model = WordLM(len(corpus), args.emb, args.hidden, num_layers=2, dropout=0.0).to(args.device)
    sd = StructuredDropout(args.dropout_in, args.dropout_rec)
    model.lstm = SparseLSTM.from_dense(model.lstm, structured_dropout=sd, gate_sparsity=gate_config(args.gate))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    dense_from = int(math.ceil(args.steps * (1 - args.dense_after)))

    batches = bptt_batches(train, args.seq)
    state, losses = None, []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step") if tqdm else range(args.steps)
    for step in bar:
        if step == dense_from:
            model.lstm.set_gate_sparsity_phase(False)
        try:
            x, y = next(batches)
        except StopIteration:
            batches, state = bptt_batches(train, args.seq), None
            x, y = next(batches)
        state = detach(state)
        logits, state = model(x, state)
        loss = loss_fn(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        losses.append(loss.item())
        if tqdm:
            bar.set_postfix(loss=f"{loss.item():.3f}", phase="dense" if step >= dense_from else "sparse")
    train_s = time.perf_counter() - start
    ppl = evaluate(model, valid, args.seq, args.eval_batches)
    summary = {
        "valid_ppl": ppl,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "steps": args.steps,
        "train_seconds": train_s,
        "structured_dropout": sd.to_dict(),
        "gate_sparsity": None if args.gate == "none" else gate_config(args.gate).to_dict(),
        "dense_after": args.dense_after,
        "hidden": args.hidden,
        "batch": args.batch,
        "seq": args.seq,
        "vocab": len(corpus),
        "device": args.device,
        "torch": torch.__version__,
    }
    print(f"validation perplexity {ppl:.2f} after {args.steps} steps ({train_s:.1f} s training)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
