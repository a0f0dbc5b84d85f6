"""Which kernels run ``eval()`` of a weight-sparse ``SparseLSTM``: an ordered rule list.

Like the training backends (:mod:`.layer`, after TVM's dlight rules), the first rule that
applies wins, and each rule that does not apply says why:

1. ``tvm_cuda_persistent_eval`` (:mod:`.persistent_eval`): CUDA input; the sparse persistent
   kernels of a bundle, one cooperative launch per layer and direction for all steps, **when
   measured faster** than ``nn.LSTM`` on this GPU at this shape (``RNN_SPARSIFY_PERSISTENT_EVAL``
   ``=auto``, the default: the first call per shape times both paths, the verdict is cached for
   the process and recorded in the reasons; ``always``: whenever a kernel applies; ``never``: off);
2. ``tvm_cpu_sparse_eval`` (:mod:`.cpu_sparse_eval`): float32 CPU input; the weight-sparse CPU
   kernels (input projection + recurrence with ``W_hh``'s non-zeros), when sparse enough to win;
3. ``nn.LSTM`` (``nn.LSTM.forward``: cuDNN / oneDNN on the same masked weights) always applies.

A rule is ``rule(module, input, hx) -> (output, note)`` when it ran (``note``: None, or a remark
such as rule 1's measured verdict), or ``(None, why)`` when it does not apply (a rule that tried
and could not launch, or was measured slower, falls through the same way). :func:`eval_forward`
records on the module ``last_eval_backend`` (the rule that ran, or ``"nn.LSTM"``),
``last_eval_reasons`` (``[(rule, "used" | "used: <note>" | why not), ...]``) and
``last_eval_reason`` (what ran, or every rule's reason joined when ``nn.LSTM`` runs) and
``last_eval_routing`` (rule 1's measured verdict in words, None when it did not measure or use one).
:func:`explain` says the same ahead of a run (``rnn-sparsify env MODEL``).
"""
from __future__ import annotations

from typing import Callable

DENSE = "nn.LSTM"
PERSISTENT = "tvm_cuda_persistent_eval"
CPU_SPARSE = "tvm_cpu_sparse_eval"

Rule = Callable[..., tuple]


def _on_cuda(input) -> bool:
    data = getattr(input, "data", input)  # PackedSequence.data, or the tensor itself
    return bool(getattr(data, "is_cuda", False))


def cuda_persistent_rule(mod, input, hx):
    """Rule 1: the sparse persistent kernels (CUDA only; see :mod:`.persistent_eval`)."""
    if not _on_cuda(input):
        return None, "the input is not on CUDA (the persistent kernels run on CUDA)"
    from .persistent_eval import sparse_persistent_forward

    out = sparse_persistent_forward(mod, input, hx)
    return (out, mod.last_eval_routing) if out is not None else (None, mod.last_eval_reason)


def cpu_sparse_rule(mod, input, hx):
    """Rule 2: the weight-sparse CPU kernels (float32 CPU only; see :mod:`.cpu_sparse_eval`)."""
    if _on_cuda(input):
        return None, "the input is on CUDA (the weight-sparse eval kernels are float32 CPU)"
    from .cpu_sparse_eval import sparse_eval_forward

    out = sparse_eval_forward(mod, input, hx)
    return (out, None) if out is not None else (None, mod.last_eval_reason)


#: ``(name, rule)`` in order; ``nn.LSTM`` comes after them and always applies.
EVAL_RULES: list[tuple[str, Rule]] = [(PERSISTENT, cuda_persistent_rule), (CPU_SPARSE, cpu_sparse_rule)]


def eval_forward(mod, input, hx=None):
    """The output of the first eval rule that applies, or ``None``: the caller runs
    ``nn.LSTM.forward`` (see the module docstring for what is recorded on ``mod``)."""
    verdicts: list[tuple[str, str]] = []
    mod.last_eval_routing = None  # rule 1's measured verdict, when it measured or used one
    for name, rule in EVAL_RULES:
        out, why = rule(mod, input, hx)
        if out is not None:
            verdicts.append((name, f"used: {why}" if why else "used"))
            mod.last_eval_backend, mod.last_eval_reasons = name, verdicts
            mod.last_eval_reason = {PERSISTENT: "sparse persistent kernels",
                                    CPU_SPARSE: "weight-sparse eval kernels"}.get(name, "used")
            if why:
                mod.last_eval_reason += f" ({why})"
            return out
        verdicts.append((name, why or "does not apply"))
    verdicts.append((DENSE, "used"))
    mod.last_eval_backend, mod.last_eval_reasons = DENSE, verdicts
    mod.last_eval_reason = "; ".join(f"{n}: {w}" for n, w in verdicts[:-1])
    return None


def explain_cuda(mod) -> str:
    """What ``eval()`` of ``mod`` runs on CUDA, in words (dry: no bundle is loaded)."""
    import torch

    from .persistent_eval import MODE_ENV_VAR, bundle_path, eval_mode, row_nnz_max, why_not_module

    static = why_not_module(mod)
    if not static and any(p.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                          for p in mod._flat_weights if p is not None):
        static = "the kernels are float32, float16 or bfloat16"
    if static:
        return f"eval() on CUDA runs nn.LSTM (cuDNN) ({static})"
    nnz = max(row_nnz_max(getattr(mod, n)) for n in mod._flat_weights_names if n.startswith("weight_hh"))
    dt = str(next(iter(mod.parameters())).dtype).replace("torch.", "")
    path = bundle_path()
    bundle = f"the bundle {path}" if path else ("a bundle (none in use: RNN_SPARSIFY_KERNELS or "
                                                "persistent_eval.use_bundle)")
    try:
        mode = eval_mode()
    except ValueError as e:
        return f"eval() on CUDA raises an error: {e}"
    if mode == "never":
        return f"eval() on CUDA runs nn.LSTM (cuDNN) ({MODE_ENV_VAR}=never)"
    routing = ({"auto": f"measured: the first call per shape times them against nn.LSTM and the faster runs from "
                        f"then on ({MODE_ENV_VAR}=auto; always/never to override)",
                "always": f"whenever they apply, unmeasured ({MODE_ENV_VAR}=always)"}[mode])
    return (f"eval() on CUDA under no_grad, without autocast, on a {dt} sequence (padded or packed): sparse "
            f"persistent kernels ({PERSISTENT}) when {bundle} has a `compile --persistent-eval` kernel for the "
            f"GPU's arch, hidden size {mod.hidden_size}, {dt}, a batch >= the call's and >= {nnz} non-zeros per "
            f"gate row (the densest W_hh row now), with a grid co-resident on the GPU, {routing}; "
            "else nn.LSTM (cuDNN)")


def explain(mod) -> str:
    """The eval rule list for ``mod`` in one line: each rule with its conditions, in order."""
    from .cpu_sparse_eval import explain_eval

    if getattr(mod, "weight_sparsity", None) is None:
        return "eval() runs nn.LSTM (no weight sparsity)"
    return (f"eval() rules, first that applies: 1. {PERSISTENT}: {explain_cuda(mod)}; 2. {CPU_SPARSE}: "
            f"{explain_eval(mod)}; 3. {DENSE}")


__all__ = ["EVAL_RULES", "cpu_sparse_rule", "cuda_persistent_rule", "eval_forward", "explain", "explain_cuda"]
