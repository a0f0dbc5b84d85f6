"""Running the model copy on the example inputs without leaving a trace: the copy itself
(:func:`copy_model`), what each module is called with (:func:`observe`, :func:`never_passed`),
and the ``eval()`` outputs the verification pass compares (:func:`outputs`, :func:`same`)."""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence as PackedSequenceType

__all__ = ["copy_model", "observe", "never_passed", "outputs", "same", "rng_preserved"]


def observe(model: nn.Module, example_inputs, example_kwargs=None,
            signatures: Optional[dict] = None, first_calls: Optional[dict] = None) -> dict[int, dict]:
    """Calls and tokens (rows of one time step) of every module on ``example_inputs`` (and
    ``example_kwargs``); with ``signatures``, also the argument types of every call of every
    module (id -> set of ``(positional types, sorted (keyword, type))``); with ``first_calls``,
    the arguments of every module's first call (id -> ``(args, kwargs)``, tensors detached)."""
    from torch.nn.utils.rnn import PackedSequence

    seen: dict[int, dict] = {}

    def hook(mod, args, kwargs):
        if signatures is not None:
            signatures.setdefault(id(mod), set()).add(
                (tuple(type(a) for a in args), tuple(sorted((k, type(v)) for k, v in kwargs.items()))))
        if first_calls is not None and id(mod) not in first_calls:
            first_calls[id(mod)] = _detached((args, dict(kwargs)))
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, PackedSequence):
            tokens, batch = int(x.data.shape[0]), int(x.batch_sizes[0])
        elif isinstance(x, torch.Tensor) and x.dim() >= 1:
            tokens = x.numel() // max(x.shape[-1], 1)
            if isinstance(mod, nn.LSTM):
                batch = 1 if x.dim() == 2 else int(x.shape[0] if mod.batch_first else x.shape[1])
            else:
                batch = tokens if x.dim() == 2 else 1
        else:
            return
        rec = seen.setdefault(id(mod), {"calls": 0, "tokens": 0, "batch": 0})
        rec["calls"] += 1
        rec["tokens"] += tokens
        rec["batch"] = max(rec["batch"], batch)

    from .trace import PythonState, is_scripted

    state = PythonState(model)  # the run must not leave a trace (self.calls += 1, buffers)
    scripted = [m for m in model.modules() if is_scripted(m)]
    inside = {id(sub) for m in scripted for sub in m.modules()}
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if id(m) not in inside]
    modes = {m: m.training for m in model.modules()}
    inputs = () if example_inputs is None else example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs, **(example_kwargs or {}))
    except Exception as e:
        raise ValueError(f"sparsify: example_inputs do not run through the model: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
        state.restore()
    return seen


def _detached(o):
    if isinstance(o, torch.Tensor):
        return o.detach()
    if isinstance(o, (tuple, list)) and not hasattr(o, "_fields"):
        return type(o)(_detached(x) for x in o)
    if isinstance(o, dict):
        return {k: _detached(v) for k, v in o.items()}
    return o


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy``, except TorchScript submodules, which are copied by a
    ``torch.jit.save``/``load`` round trip (their deepcopy yields non-leaf parameters), and
    ``__slots__`` values, which are copied explicitly."""
    import io

    from .trace import is_scripted

    memo: dict = {}
    for m in model.modules():
        if is_scripted(m) and id(m) not in memo:
            buf = io.BytesIO()
            torch.jit.save(m, buf)
            buf.seek(0)
            dev = next((p.device for p in m.parameters()), None)
            new = torch.jit.load(buf, map_location=dev)
            new.train(m.training)
            for (_, p_old), (_, p_new) in zip(m.named_parameters(), new.named_parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            memo[id(m)] = new
            for sub in m.modules():  # children are copied with their scripted parent
                memo.setdefault(id(sub), None) if sub is not m else None
    memo = {k: v for k, v in memo.items() if v is not None}
    work = copy.deepcopy(model, memo)
    # nn.Module's __getstate__ returns only __dict__: values in __slots__ of a user subclass
    # would be lost (also by torch.save); copy them over
    for m in model.modules():
        new = memo.get(id(m))
        if new is None or new is m:
            continue
        for name in {n for k in type(m).__mro__ for n in getattr(k, "__slots__", ()) if isinstance(n, str)}:
            if name in ("__dict__", "__weakref__") or not hasattr(m, name):
                continue
            setattr(new, name, copy.deepcopy(getattr(m, name), memo))
    return work



def outputs(model: nn.Module, inputs: tuple, kwargs: Optional[dict] = None) -> list:
    """The tensors of ``model(*inputs)`` in eval() under no_grad, seeded, leaving no trace
    (Python state, train modes)."""
    from .trace import PythonState

    state = PythonState(model)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            out = model(*inputs, **(kwargs or {}))
    finally:
        for m, t in modes.items():
            m.training = t
        state.restore()

    def flat(o):
        if isinstance(o, torch.Tensor):
            return [o.detach().clone()]
        if isinstance(o, PackedSequenceType):
            return flat(tuple(o))
        if isinstance(o, (tuple, list)):
            return [t for x in o for t in flat(x)]
        if isinstance(o, dict):
            return [t for k in sorted(o, key=str) for t in flat(o[k])]
        return []

    return flat(out)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y) or
                                                           torch.equal(x.isnan(), y.isnan()) and
                                                           torch.equal(x.nan_to_num(), y.nan_to_num()))
        for x, y in zip(a, b))



def rng_preserved(model):
    """The global torch RNG state (CPU and the CUDA devices of ``model``) is the same after
    ``sparsify`` as before: running ``example_inputs`` or a factory may draw from it, and a
    user's seeded run must not depend on whether it was sparsified."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda}) if isinstance(
        model, nn.Module) else []
    return torch.random.fork_rng(devices=devices)


def never_passed(model: nn.Module, signatures: dict[int, set]) -> dict[int, frozenset]:
    """Per observed module, the optional ``forward`` parameters (default None) that no call
    of the example inputs passed, or passed as None: traced as None."""
    import inspect

    from .rewrite import forward_params

    out: dict[int, frozenset] = {}
    for m in model.modules():
        sigs = signatures.get(id(m))
        if not sigs:
            continue
        names, plain = forward_params(m)
        if not plain:
            continue
        defaults = {n: p.default for n, p in inspect.signature(type(m).forward).parameters.items()}
        cand = {n for n in names if defaults.get(n, inspect.Parameter.empty) is None}
        for pos, kw in sigs:
            passed = {n for n, t in (*zip(names, pos), *kw) if t is not type(None)}
            cand -= passed
        if cand:
            out[id(m)] = frozenset(cand)
    return out

