"""Train a 2-layer word-level LSTM language model dense and through ``rnn_sparsify.sparsify``
side by side, and compare perplexity and training speed.

    python examples/train_lm.py                       # the demo: dense vs sparse, about a minute on 2 CPU cores
    python examples/train_lm.py --no-compare          # only the sparse model
    python examples/train_lm.py --gate coarse         # + coarse gate-gradient sparsity, dense-after-sparse
    python examples/train_lm.py --gate fine --dropout-in 0.5 --dropout-rec 0.5 --steps 2000
    python examples/train_lm.py --data my_corpus/ --out runs/lm.json --plot runs/lm.png
    python examples/train_lm.py --sparse-dropout standard --gate none --weight-method gradual --weight-sparsity 0.9 \
        --optimizer adam --emb 256 --hidden 256 --steps 1000        # gradual pruning (Narang) vs dense
    python examples/train_lm.py --sparse-dropout standard --gate none --weight-method dst --weight-init erdos_renyi

Both runs start from the same initial weights, see the same batches and the same seed, and
train for the same number of steps, one after the other in this process:

* ``dense``: the plain model (``nn.LSTM``) with standard dropout at rate ``--dropout-in`` on
  the embedding, between the LSTM layers and on the LSTM output;
* ``sparse``: the same model through ``sparsify(model, StructuredDropout(...),
  GateGradientSparsity...)``: structured dropout (NR ``--dropout-in`` + RH ``--dropout-rec``,
  Sarma et al.; the embedding dropout is fused into it), with ``--gate`` gate-gradient sparsity
  (Zhu et al.; default none, the setting ``docs/results.md`` supports) with dense gate gradients
  for the final ``--dense-after`` fraction of the steps,
  and, with ``--weight-method``, weight sparsity of the LSTM's input and recurrent matrices:
  ``gradual`` magnitude pruning to ``--weight-sparsity`` (Narang et al.), ``dst`` dynamic sparse
  training at a fixed ``--weight-sparsity`` (ST-RNN, Liu et al.; ``--weight-init uniform`` or
  ``erdos_renyi``), or ``static``: the same random sparse topology as ``dst``, never changed.
  ``--sparse-dropout standard`` keeps the model's own (standard) dropout in the sparse model, so
  one technique can be compared with the dense model alone; ``--dense-only`` trains only the
  dense model.

``benchmarks/reproduce_papers.py`` runs this script for every technique and seed and writes
``docs/results.md``.

Prints the sparsify report, the layer backend the sparse LSTM ran on, a progress bar per run
and a table (validation / test perplexity, ms per training step, speed-up vs dense); writes a
PNG of the learning curves (``--plot``; needs matplotlib) and, with ``--out``, a JSON summary
``{"runs": [{"variant", "val_ppl", "test_ppl", "ms_per_step", ...}, ...]}``. ms per step times
only the training steps (forward, backward, clipping, optimizer step), not evaluation and not
the first step (which compiles / loads kernels).

``--data DIR`` is a folder with plain-text ``train.txt``, ``valid.txt`` and ``test.txt`` (one
sentence or line per line; words split on whitespace, lower-cased, the ``--vocab`` most
frequent training words kept, the rest ``<unk>``). The default is the shipped Shakespeare
corpus in ``examples/data/shakespeare``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_common import (  # noqa: E402
    DATA_DIR, DEFAULT_WEIGHT_SPARSITY, GATE_MODES, WEIGHT_METHODS, Corpus, WordLM, batchify, bptt_batches, detach,
    evaluate, gate_config, weight_config,
)

from rnn_sparsify import StructuredDropout, sparsify  # noqa: E402
from rnn_sparsify.weight_sparsity import (  # noqa: E402
    DSTScheduler, GradualPruningScheduler, format_weight_sparsity_stats, weight_sparsity_stats,
)

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency, but keep the example standalone
    tqdm = None

SPLITS = ("train.txt", "valid.txt", "test.txt")
DEFAULT_PLOT = Path("runs") / "lm_compare.png"


def check_data(parser: argparse.ArgumentParser, data: Path) -> None:
    """One-line error (exit 2) for a folder that is missing, lacks a split or has an empty one."""
    if not data.is_dir():
        parser.error(f"--data {data}: not a folder (it needs {', '.join(SPLITS)})")
    missing = [s for s in SPLITS if not (data / s).is_file()]
    if missing:
        parser.error(f"--data {data}: missing {', '.join(missing)} (a data folder needs {', '.join(SPLITS)})")
    for s in SPLITS:
        try:
            text = (data / s).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            parser.error(f"--data {data}: {s} is not UTF-8 text")
        if not text.split():
            parser.error(f"--data {data}: {s} is empty (no words)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="folder with train.txt, valid.txt, test.txt (default: shipped Shakespeare)")
    ap.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the dense model and compare (default: on; --no-compare trains only the sparse model)")
    ap.add_argument("--dense-only", action="store_true", help="train only the dense model")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--emb", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=200)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--seq", type=int, default=35)
    ap.add_argument("--steps", type=int, default=300, help="training steps (truncated-BPTT batches) per run")
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="both runs (default: plain SGD)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: 20 for sgd, 2e-3 for adam)")
    ap.add_argument("--clip", type=float, default=0.25)
    ap.add_argument("--dropout-in", type=float, default=0.3,
                    help="sparse: structured NR dropout; dense: the standard dropout rate")
    ap.add_argument("--dropout-rec", type=float, default=0.3, help="sparse: structured RH dropout")
    ap.add_argument("--sparse-dropout", choices=["structured", "standard"], default="structured",
                    help="sparse model's dropout: structured NR+RH (default) or the model's standard dropout "
                         "(as the dense model; --dropout-rec unused)")
    ap.add_argument("--gate", choices=GATE_MODES, default="none",
                    help="gate-gradient sparsity of the sparse model (default: none; docs/results.md: coarse "
                         "narrowly misses dense perplexity even with dense-after-sparse, and on the CPU kernels it "
                         "is slower than structured dropout alone, docs/benchmarks.md)")
    ap.add_argument("--dense-after", type=float, default=0.25,
                    help="final fraction of steps with dense gate gradients (0: sparse to the end)")
    ap.add_argument("--weight-method", choices=WEIGHT_METHODS, default="none",
                    help="weight sparsity of the sparse model's LSTM: gradual pruning, dynamic sparse training, "
                         "or a static random sparse topology (default: none)")
    ap.add_argument("--weight-sparsity", type=float, default=None,
                    help="target (gradual) or fixed (dst, static) sparsity; default " +
                         ", ".join(f"{k} {v}" for k, v in DEFAULT_WEIGHT_SPARSITY.items()))
    ap.add_argument("--weight-init", choices=["uniform", "erdos_renyi"], default="uniform",
                    help="dst/static: initial sparse topology")
    ap.add_argument("--weight-freq", type=int, default=50, help="gradual: steps between mask updates")
    ap.add_argument("--update-every", type=int, default=50, help="dst: steps between prune/regrow")
    ap.add_argument("--prune-rate", type=float, default=0.5, help="dst: initial prune/regrow fraction")
    ap.add_argument("--weight-block", type=int, nargs=2, default=(1, 1), metavar=("ROWS", "COLS"),
                    help="weight-sparsity pruning block")
    ap.add_argument("--eval-batches", type=int, default=None, help="cap validation/test batches (default: all)")
    ap.add_argument("--curve-points", type=int, default=5,
                    help="validation points on the learning curve (on at most 20 validation batches; 0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    ap.add_argument("--plot", type=Path, default=None,
                    help=f"learning-curve PNG (default: next to --out, else {DEFAULT_PLOT}); needs matplotlib")
    ap.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return ap


EVAL_BATCH = 10


def eval_state(args):
    """Zero initial state for evaluation (a given state keeps the sparsified model on its traced forward)."""
    return tuple(torch.zeros(2, EVAL_BATCH, args.hidden, device=args.device) for _ in range(2))


def train_run(name, model, args, train, valid, state0, dense_from, weight_method="none"):
    """Train ``model`` for ``args.steps`` steps; returns (per-step ms list, losses, val curve)."""
    torch.manual_seed(args.seed + 1)  # same dropout stream seed for both runs
    model.train()
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    sched = {"gradual": GradualPruningScheduler, "dst": DSTScheduler, "static": DSTScheduler}.get(weight_method)
    sched = sched(model, opt) if sched is not None else None
    loss_fn = nn.CrossEntropyLoss()
    batches = bptt_batches(train, args.seq)
    state = state0
    losses, step_ms, curve = [], [], []
    n_pts = max(0, min(args.curve_points, args.steps))
    curve_at = {round(args.steps * (k + 1) / n_pts) - 1 for k in range(n_pts)} if n_pts else set()
    curve_batches = min(20, args.eval_batches) if args.eval_batches else 20
    bar = tqdm(range(args.steps), desc=f"{name:>6}", unit="step") if tqdm else range(args.steps)
    for step in bar:
        if dense_from is not None and step == dense_from:
            model.lstm.set_gate_sparsity_phase(False)
        try:
            x, y = next(batches)
        except StopIteration:
            batches, state = bptt_batches(train, args.seq), state0
            x, y = next(batches)
        if x.size(0) != args.seq:  # ragged last chunk: restart (keeps every step the same shape)
            batches, state = bptt_batches(train, args.seq), state0
            x, y = next(batches)
        t0 = time.perf_counter()
        state = detach(state)
        logits, state = model(x, state)
        loss = loss_fn(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if sched is not None:
            sched.step()  # mask update (on its schedule); masked weights and optimizer state stay zero
        lv = loss.item()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(lv)
        if step in curve_at:
            curve.append((step + 1, evaluate(model, valid, args.seq, curve_batches, eval_state(args))))
        if tqdm:
            post = {"loss": f"{lv:.3f}"}
            if dense_from is not None:
                post["phase"] = "dense" if step >= dense_from else "sparse"
            if sched is not None:
                post["w.sparsity"] = f"{sched.sparsity():.2f}"
            bar.set_postfix(post)
    if tqdm:
        bar.close()
    return step_ms, losses, curve


def write_plot(path: Path, runs: list[dict], args) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib, or the project's "
              "'bench' or 'dev' extra)")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    w = max(1, args.steps // 30)
    for r in runs:
        losses = r["train_loss"]
        smooth = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1]) for i in range(len(losses))]
        line, = ax1.plot(range(1, len(losses) + 1), smooth, label=f"{r['variant']} (train, mean of {w})")
        ax1.plot(range(1, len(losses) + 1), losses, color=line.get_color(), alpha=0.2, lw=0.7)
        if r["val_curve"]:
            s, p = zip(*r["val_curve"])
            ax2.plot(s, p, "o-", color=line.get_color(), label=f"{r['variant']} (valid, first batches)")
        ax2.plot([args.steps], [r["val_ppl"]], "*", ms=12, color=line.get_color(), label=f"{r['variant']} final valid {r['val_ppl']:.1f}")
    ax1.set(xlabel="training step", ylabel="training loss (nats/word)", title="training loss")
    ax2.set(xlabel="training step", ylabel="validation perplexity", title="validation perplexity", yscale="log")
    ax1.legend()
    ax2.legend(fontsize=8)
    fig.suptitle(f"{args.data.name}: 2x{args.hidden} LSTM LM, {args.steps} steps, batch {args.batch}x{args.seq}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_data(ap, args.data)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is warm-up and not timed)")
    if args.lr is None:
        args.lr = 2e-3 if args.optimizer == "adam" else 20.0
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if not 0 <= args.dense_after <= 1:
        ap.error("--dense-after must be in [0, 1]")
    try:
        ws = weight_config(args.weight_method, args.steps, args.weight_sparsity, init=args.weight_init,
                           freq=args.weight_freq, update_every=args.update_every, prune_rate=args.prune_rate,
                           block=tuple(args.weight_block), seed=args.seed)
    except ValueError as e:
        ap.error(f"weight sparsity: {e}")
    gs = gate_config(args.gate)
    sd = StructuredDropout(args.dropout_in, args.dropout_rec) if args.sparse_dropout == "structured" else None
    configs = [c for c in (sd, gs, ws) if c is not None]
    if not configs and not args.dense_only:
        ap.error("nothing to sparsify: --sparse-dropout standard with --gate none and --weight-method none "
                 "(use --dense-only to train only the dense model)")

    corpus = Corpus(args.data, args.vocab)
    train = batchify(corpus.train, args.batch).to(args.device)
    valid = batchify(corpus.valid, EVAL_BATCH).to(args.device)
    test = batchify(corpus.test, EVAL_BATCH).to(args.device)
    if train.size(0) <= args.seq:
        ap.error(f"--data {args.data}: train.txt has too few words for --batch {args.batch} x --seq {args.seq}")
    if valid.size(0) < 2 or test.size(0) < 2:
        ap.error(f"--data {args.data}: valid.txt and test.txt need at least 20 words each")

    torch.manual_seed(args.seed)
    dense = WordLM(len(corpus), args.emb, args.hidden, num_layers=2, dropout=args.dropout_in).to(args.device)
    init = copy.deepcopy(dense.state_dict())
    state0 = tuple(torch.zeros(2, args.batch, args.hidden, device=args.device) for _ in range(2))
    sparse = None
    if not args.dense_only:
        example = (train[: args.seq], state0)  # a training batch and state: the traced forward is the one training uses
        sparse = sparsify(dense, *configs, example_inputs=example)
        print(f"sparsify(model, {', '.join(repr(c) for c in configs)}):")
        print(sparse.rnn_sparsify_report)
        print()
        # its own initial state: the init weights, and with weight sparsity the masks drawn at
        # sparsify time (loading the dense init would make the masks dense again)
        sparse_init = copy.deepcopy(sparse.state_dict()) if ws is not None else init

    if args.dense_only:
        plan = [("dense", dense)]
    else:
        plan = ([("dense", dense)] if args.compare else []) + [("sparse", sparse)]
    dense_from = int(math.ceil(args.steps * (1 - args.dense_after))) if gs is not None else None
    print(f"{len(plan)} run{'s' if len(plan) > 1 else ''} of {args.steps} steps, one after the other "
          f"(sequential, same process, same initial weights, batches and seed); "
          f"{torch.get_num_threads()} torch threads")
    runs = []
    for name, model in plan:
        model.load_state_dict(sparse_init if name == "sparse" else init, strict=False)
        step_ms, losses, curve = train_run(name, model, args, train, valid, state0,
                                           dense_from if name == "sparse" else None,
                                           args.weight_method if name == "sparse" else "none")
        backend = (getattr(model.lstm, "last_backend", None) or "torch (nn.LSTM)") if name == "sparse" else "torch (nn.LSTM)"
        extra = {}
        if name == "sparse":
            print(f"sparse LSTM layer backend: {backend}")
            if ws is not None:
                st = weight_sparsity_stats(model.lstm)
                print(format_weight_sparsity_stats(st, "lstm"))
                nnz = sum(m["nnz"] for m in st["matrices"])
                numel = sum(m["numel"] for m in st["matrices"])
                extra = {"lstm_weight_sparsity": 1.0 - nnz / numel, "lstm_weight_nnz": nnz,
                         "lstm_params_ratio": st["params"]["ratio"], "lstm_flops_ratio": st["flops"]["ratio"]}
        timed = step_ms[1:]
        runs.append({
            "variant": name,
            "val_ppl": evaluate(model, valid, args.seq, args.eval_batches, eval_state(args)),
            "test_ppl": evaluate(model, test, args.seq, args.eval_batches, eval_state(args)),
            "ms_per_step": sum(timed) / len(timed),
            "steps": args.steps,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "backend": backend,
            "train_loss": losses,
            "val_curve": curve,
            **extra,
        })

    base = runs[0]["ms_per_step"] if runs[0]["variant"] == "dense" else None
    print()
    print(f"{'variant':<8} {'valid ppl':>10} {'test ppl':>10} {'ms/step':>9} {'speed-up':>9}")
    for r in runs:
        sp = f"{base / r['ms_per_step']:.2f}x" if base else "-"
        print(f"{r['variant']:<8} {r['val_ppl']:>10.2f} {r['test_ppl']:>10.2f} {r['ms_per_step']:>9.1f} {sp:>9}")
    print(f"({args.steps} steps each, sequential runs; ms/step excludes evaluation and the first (warm-up) step)")

    summary = {
        "runs": runs,
        "config": {
            "data": str(args.data), "vocab": len(corpus), "emb": args.emb, "hidden": args.hidden,
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "structured_dropout": None if sd is None else sd.to_dict(),
            "gate_sparsity": None if gs is None else gs.to_dict(),
            "weight_sparsity": None if ws is None else ws.to_dict(), "weight_method": args.weight_method,
            "dense_after": args.dense_after, "dense_dropout": args.dropout_in, "optimizer": args.optimizer,
            "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
    }
    if not args.no_plot:
        plot = args.plot or (args.out.with_suffix(".png") if args.out else DEFAULT_PLOT)
        if write_plot(plot, runs, args):
            print(f"learning curves: {plot}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
        print(f"summary: {args.out}")
    return summary


if __name__ == "__main__":
    main()
