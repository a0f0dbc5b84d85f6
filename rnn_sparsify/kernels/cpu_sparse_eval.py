"""``eval()`` of a weight-sparse ``SparseLSTM`` on TVM-generated sparse CPU kernels.

An LSTM pruned by :class:`~rnn_sparsify.weight_sparsity.WeightSparsity` (gradual or DST) keeps
its masked weights at zero. In ``eval()`` under ``torch.no_grad()`` / ``torch.inference_mode()``
on the CPU, :func:`sparse_eval_forward` runs each layer/direction on two kernels of
:mod:`rnn_sparsify.codegen.cpu_sparse`: the input projection of all steps as one sparse
matrix product, then the recurrence with the recurrent weights' non-zeros in a compact row
format that stays in cache across steps (the CPU counterpart of the sparse persistent RNN).

It computes the dense masked computation (``nn.LSTM`` on the same weights) with the zero
products skipped, so the result differs from ``nn.LSTM`` only by float32 rounding (another
summation order; the tests hold it to 2e-5 relative). Where it does not apply, or would not be
faster, ``nn.LSTM.forward`` runs, exactly as before; ``module.last_eval_backend`` and
``module.last_eval_reason`` say which ran and why. It is rule 2 of the eval rule list
(:mod:`.eval_rules`: CUDA persistent kernels, these, ``nn.LSTM``; ``rnn-sparsify env MODEL``
prints it). It applies when:

* the module carries weight-sparsity masks on ``W_hh`` and every masked matrix has at most
  :func:`density_limit` non-zeros for the batch (the measured break-even against nn.LSTM,
  :data:`DENSITY_LIMITS`, ``docs/benchmarks.md``); an unmasked ``W_ih`` runs as one dense
  GEMM over all steps;
* no gradient is needed (``torch.no_grad()``, ``inference_mode``, or nothing requires grad),
  float32 CPU tensors (``PackedSequence`` too), no autocast, no ``proj_size``, not inside a
  ``torch.func`` transform, TorchScript or dynamo trace;
* ``RNN_SPARSIFY_CPU_KERNELS=0`` switches it off; without ``apache-tvm-ffi`` (or without
  kernels and TVM to build them) ``nn.LSTM`` runs, with one warning.

The sparse format is built once per weight version (a ``state_dict`` load, an optimizer step
or any in-place write rebuilds it on the next call).
"""
from __future__ import annotations

import os
import warnings
import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

#: ``(largest batch, density)``: the sparse kernels run when every masked matrix has at most
#: ``density`` non-zeros; measured break-even against nn.LSTM (oneDNN) on an AVX-512 host,
#: 2x650, 1 thread, with a margin (``docs/benchmarks.md``, weight-sparse eval)
DENSITY_LIMITS = ((1, 0.12), (8, 0.22), (None, 0.12))
BACKEND = "tvm_cpu_sparse_eval"
DENSE = "nn.LSTM"

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FAILED: dict = {}
_WARNED: set = set()


def density_limit(batch: int) -> float:
    """The largest density at which the sparse kernels beat nn.LSTM for ``batch`` rows
    (``RNN_SPARSIFY_EVAL_DENSITY_LIMIT`` overrides, e.g. to benchmark past the break-even)."""
    env = os.environ.get("RNN_SPARSIFY_EVAL_DENSITY_LIMIT")
    if env:
        return float(env)
    for top, limit in DENSITY_LIMITS:
        if top is None or batch <= top:
            return limit
    return 0.0  # pragma: no cover - the table ends with None


def _warn_once(key, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"rnn_sparsify: {msg}", RuntimeWarning, stacklevel=4)


def padded_csr(w: Tensor, hidden: int, *, scale: int = 1, idx_dtype=torch.int16, pad: Optional[int] = None):
    """``(indptr, col, val, density)`` of the gate matrix ``w`` (4H, n) in the kernels' format:
    rows interleaved by unit (row ``4j+g`` = gate g of unit j), each row's non-zeros padded
    with zero entries to a multiple of ``pad`` (default: the kernels' ``P``), column indices
    multiplied by ``scale``."""
    if pad is None:
        from rnn_sparsify.codegen.cpu_sparse import P as pad
    n = w.shape[1]
    wi = w.detach().reshape(4, hidden, n).transpose(0, 1).reshape(4 * hidden, n)
    nz = wi != 0
    counts = nz.sum(1)
    padded = (counts + pad - 1) // pad * pad
    indptr = torch.zeros(4 * hidden + 1, dtype=torch.int64)
    torch.cumsum(padded, 0, out=indptr[1:])
    rows, cols = nz.nonzero(as_tuple=True)
    first = torch.zeros(4 * hidden, dtype=torch.int64)
    first[1:] = torch.cumsum(counts, 0)[:-1]
    dest = indptr[rows] + (torch.arange(rows.numel()) - first[rows])
    total = int(indptr[-1])
    col = torch.zeros(total, dtype=idx_dtype)
    val = torch.zeros(total, dtype=torch.float32)
    col[dest] = (cols * scale).to(idx_dtype)
    val[dest] = wi[rows, cols].float()
    density = float(counts.sum()) / max(1, wi.numel())
    return indptr.to(torch.int32), col, val, density


def _interleave(v: Tensor, hidden: int) -> Tensor:
    """Gate-major (4H, ...) -> unit-major interleaved rows (row 4j+g)."""
    return v.reshape(4, hidden, *v.shape[1:]).transpose(0, 1).reshape(4 * hidden, *v.shape[1:]).contiguous()


def _masked(mod) -> list:
    from rnn_sparsify.weight_sparsity import _masked_matrices

    return _masked_matrices(mod)


def why_not(mod, input, hx) -> Optional[str]:
    """Why the sparse eval kernels do not apply to this call (None: they do)."""
    if os.environ.get("RNN_SPARSIFY_CPU_KERNELS", "1") == "0":
        return "switched off by RNN_SPARSIFY_CPU_KERNELS=0"
    if getattr(mod, "weight_sparsity", None) is None:
        return "no weight sparsity"
    if "hh" not in {m.kind for m in _masked(mod)}:
        return "W_hh is not masked (the recurrence would stay dense)"
    if mod.proj_size:
        return "proj_size > 0 (no projection kernels)"
    packed = isinstance(input, PackedSequence)
    if packed:
        input = input.data
    if not isinstance(input, Tensor):
        return "unexpected input type (nn.LSTM reports the error)"
    if input.device.type != "cpu" or input.dtype != torch.float32:
        return f"{input.dtype} on {input.device} (the kernels are float32 CPU)"
    params = [p for p in mod._flat_weights if p is not None]
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return "parameters are not float32 CPU tensors"
    if torch.is_grad_enabled() and (
        input.requires_grad or any(p.requires_grad for p in params)
        or (hx is not None and any(isinstance(h, Tensor) and h.requires_grad for h in hx))
    ):
        return "gradients are needed (run eval under torch.no_grad() or torch.inference_mode())"
    from rnn_sparsify.lstm_function import _cpu_autocast_dtype, _in_func_transform

    if _cpu_autocast_dtype(input) is not None:
        return "CPU autocast is on"
    if _in_func_transform():
        return "inside a torch.func transform"
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return "TorchScript"
    try:
        if torch.compiler.is_compiling():
            return "inside torch.compile"
    except AttributeError:  # pragma: no cover - older torch
        pass
    if input.dim() not in ((2,) if packed else (2, 3)) or input.shape[-1] != mod.input_size or input.numel() == 0:
        return "unexpected input shape (nn.LSTM reports the error)"
    return None


def rule_text() -> str:
    """:data:`DENSITY_LIMITS` in words: "<= 12% dense at batch 1, <= 22% at batch 2-8, ..."."""
    parts, lo = [], 1
    for top, lim in DENSITY_LIMITS:
        at = f"batch {lo}" if top == lo else (f"batch {lo}-{top}" if top else f"batch > {lo - 1}")
        parts.append(f"<= {lim:.0%} dense at {at}")
        lo = (top or 0) + 1
    return ", ".join(parts)


def explain_eval(mod) -> str:
    """What ``eval()`` of ``mod`` runs on the CPU, in words (dry: nothing is built)."""
    from torch import nn

    if getattr(mod, "weight_sparsity", None) is None:
        return "eval() runs the dense PyTorch path"
    if not isinstance(mod, nn.LSTM):
        return "eval() runs the dense PyTorch path (no weight-sparse eval kernels for cells)"
    static = None
    if os.environ.get("RNN_SPARSIFY_CPU_KERNELS", "1") == "0":
        static = "switched off by RNN_SPARSIFY_CPU_KERNELS=0"
    elif "hh" not in {m.kind for m in _masked(mod)}:
        static = "W_hh is not masked"
    elif mod.proj_size:
        static = "proj_size > 0"
    elif any(p.dtype != torch.float32 for p in mod._flat_weights if p is not None):
        static = "the kernels are float32"
    if static:
        return f"eval() runs the dense PyTorch path ({static})"
    dens = max(float(torch.count_nonzero(getattr(mod, m.name))) / getattr(mod, m.name).numel()
               for m in _masked(mod))
    return (f"eval() under no_grad on float32 CPU tensors: weight-sparse kernels ({BACKEND}) when {rule_text()}; "
            f"now {dens:.0%} dense, else nn.LSTM")


class _Prepared:
    """The sparse formats of one module's weights, valid for one set of weight versions."""

    def __init__(self, key, layers, density: float):
        self.key = key
        self.layers = layers  # {(layer, direction): formats}
        self.density = density  # of the densest masked matrix


def _weights_key(mod) -> tuple:
    ts = [p for p in mod._flat_weights if p is not None]
    ts += [getattr(mod, n + "_mask") for n in getattr(mod, "_weight_sparsity_params", ())]
    return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in ts)


def _prepare(mod, limit: float) -> _Prepared:
    """The module's sparse formats (built once per weight version; ``layers`` stays None
    while the weights are denser than ``limit``)."""
    key = _weights_key(mod)
    prep = _CACHE.get(mod)
    if prep is None or prep.key != key:
        masked = _masked(mod)
        dens = max(float(torch.count_nonzero(getattr(mod, m.name))) / getattr(mod, m.name).numel()
                   for m in masked)
        prep = _CACHE[mod] = _Prepared(key, None, dens)
    if prep.layers is None and prep.density <= limit:
        prep.layers = _build_formats(mod)
    return prep


def _build_formats(mod) -> dict:
    from rnn_sparsify.lstm_function import _layer_params

    H = mod.hidden_size
    masked = {m.name for m in _masked(mod)}
    layers = {}
    for layer in range(mod.num_layers):
        for d in range(2 if mod.bidirectional else 1):
            w_ih, w_hh, b_ih, b_hh, _ = _layer_params(mod, layer, d)
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            ent = {}
            n = w_ih.shape[1]
            if "weight_ih" + sfx in masked:
                ip, col, val, _ = padded_csr(w_ih, H, idx_dtype=torch.int16 if n < 32768 else torch.int32)
                ent["in"] = (ip, col, val)
            else:  # not masked: one dense GEMM over all steps
                ent["in_dense"] = _interleave(w_ih.detach().float(), H)
            bias = torch.zeros(4 * H)
            if b_ih is not None:
                bias = (b_ih.detach() + b_hh.detach()).float()
            ent["bias"] = _interleave(bias, H)
            ip, col, val, _ = padded_csr(w_hh, H, idx_dtype=torch.int32)
            ent["rec_base"] = (ip, col.long(), val)  # offsets (col * Bp) made per padded batch
            ent["rec_fmt"] = {}
            layers[layer, d] = ent
    return layers


def _rec_format(ent: dict, H: int, Bp: int, off_dtype: str):
    fmt = ent["rec_fmt"].get(Bp)
    if fmt is None:
        ip, col, val = ent["rec_base"]
        fmt = ent["rec_fmt"][Bp] = (ip, (col * Bp).to(getattr(torch, off_dtype)), val)
    return fmt


def sparse_eval_forward(mod, input, hx=None):
    """``nn.LSTM.forward`` on the sparse eval kernels, or None where they do not apply
    (the caller then runs ``nn.LSTM.forward``); records ``mod.last_eval_backend`` /
    ``mod.last_eval_reason``."""
    why = why_not(mod, input, hx)
    if why is None:
        try:
            out = _run(mod, input, hx)
        except _Unavailable as e:
            why = str(e)
        else:
            mod.last_eval_backend, mod.last_eval_reason = BACKEND, "weight-sparse eval kernels"
            return out
    mod.last_eval_backend, mod.last_eval_reason = DENSE, why
    if why.startswith("gradients are needed"):
        _warn_once(("grad", id(mod)),
                   f"{type(mod).__name__} is weight-sparse but runs eval on the dense nn.LSTM path: "
                   + why)
    return None


class _Unavailable(RuntimeError):
    pass


def _spec(mod, n_in: int, B: int):
    from rnn_sparsify.codegen.cpu_sparse import CpuSparseEvalSpec, pad_batch

    from .cpu_runtime import host_isa

    isa = host_isa()
    return CpuSparseEvalSpec(input_size=n_in, hidden_size=mod.hidden_size, batch=pad_batch(B, isa),
                             isa=isa)


def _load(spec):
    if spec in _FAILED:
        raise _Unavailable(_FAILED[spec])
    try:
        from .cpu_runtime import load_layer

        return load_layer(spec)
    except Exception as e:  # never an error: nn.LSTM runs instead
        reason = f"CPU kernels unavailable: {e}"
        _FAILED[spec] = reason
        _warn_once(("load", spec), f"{reason}; weight-sparse eval runs on nn.LSTM (dense)")
        raise _Unavailable(reason) from None


def _run(mod, input, hx):
    from .cpu_runtime import set_num_threads

    packed = isinstance(input, PackedSequence)
    lens = None
    if packed:  # padded in the caller's batch order, as hx and the returned state are
        x, lens = pad_packed_sequence(input)
        unbatched = False
    else:
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if mod.batch_first else input)
    T, B, _ = x.shape
    if lens is None:
        lens = torch.full((B,), T, dtype=torch.long)
    # the reverse direction reads each sequence backwards from its own last step: step t of
    # row b is step lens[b] - 1 - t (t < lens[b]; padding stays behind, where it is ignored)
    tt = torch.arange(T)[:, None]
    rev = torch.where(tt < lens[None, :], lens[None, :] - 1 - tt, tt)  # (T, B), an involution
    cols = torch.arange(B)
    H, L = mod.hidden_size, mod.num_layers
    D = 2 if mod.bidirectional else 1
    if hx is not None:
        h0, c0 = hx
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        if (h0.shape != (L * D, B, H) or c0.shape != (L * D, B, H) or h0.dtype != torch.float32
                or c0.dtype != torch.float32 or h0.device.type != "cpu" or c0.device.type != "cpu"):
            raise _Unavailable("unexpected hx (nn.LSTM reports the error)")
    limit = density_limit(B)
    prep = _prepare(mod, limit)
    if prep.density > limit:
        raise _Unavailable(f"weights {prep.density:.0%} dense (> {limit:.0%} at batch {B}: "
                           "nn.LSTM's dense kernels are faster)")
    libs = {}
    for n_in in {mod.input_size, D * H}:
        spec = _spec(mod, n_in, B)
        libs[n_in] = (spec, _load(spec))
    Bp, Hp = spec.batch, spec.hidden_padded
    set_num_threads(torch.get_num_threads())
    hn = torch.empty(L * D, B, H)
    cn = torch.empty(L * D, B, H)
    layer_in = x
    for layer in range(L):
        n = layer_in.shape[2]
        spec, lib = libs[n]
        V = spec.vec
        Np = -(-T * Bp // V) * V
        outs = []
        for d in range(D):
            ent = prep.layers[layer, d]
            xin = layer_in[rev, cols] if d else layer_in
            Xt = torch.zeros(n, Np)
            Xt[:, :T * Bp].view(n, T, Bp)[:, :, :B] = xin.permute(2, 0, 1)
            if "in" in ent:
                G = torch.empty(4 * H, Np)
                lib["spmm_in"](*ent["in"], ent["bias"], Xt, G)
            else:
                G = torch.addmm(ent["bias"].unsqueeze(1), ent["in_dense"], Xt)
            Hs = torch.zeros(T + 1, Hp, Bp)
            Cs = torch.zeros(T + 1, Hp, Bp)
            if hx is not None:
                Hs[0, :H, :B] = h0[layer * D + d].t()
                Cs[0, :H, :B] = c0[layer * D + d].t()
            ip, off, val = _rec_format(ent, H, Bp, spec.off_dtype())
            lib["rec_loop"](ip, off, val, G, Hs.view(T + 1, Hp * Bp), Cs.view(T + 1, Hp * Bp))
            out = Hs[1:, :H, :B].permute(0, 2, 1)
            outs.append(out[rev, cols] if d else out)
            hn[layer * D + d] = Hs[lens, :H, cols]  # each sequence's state after its last step
            cn[layer * D + d] = Cs[lens, :H, cols]
        layer_in = outs[0] if D == 1 else torch.cat(outs, 2)
    output = layer_in.contiguous()
    if packed:
        bs = input.batch_sizes
        order = input.sorted_indices if input.sorted_indices is not None else cols
        t_idx = torch.repeat_interleave(torch.arange(T), bs)
        first = torch.cumsum(bs, 0) - bs
        b_idx = order[torch.arange(int(bs.sum())) - first[t_idx]]
        return PackedSequence(output[t_idx, b_idx], bs, input.sorted_indices, input.unsorted_indices), (hn, cn)
    if unbatched:
        return output.squeeze(1), (hn.squeeze(1), cn.squeeze(1))
    if mod.batch_first:
        output = output.transpose(0, 1)
    return output, (hn, cn)


__all__ = ["BACKEND", "DENSITY_LIMITS", "density_limit", "explain_eval", "padded_csr", "sparse_eval_forward",
           "why_not"]
