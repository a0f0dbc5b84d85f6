"""Masks on one module: the weight matrices of an LSTM (``_lstm_matrices``), gate-aware
blocks and the initial selection, the ``<param>_mask`` buffers, the gradient hooks and
``load_state_dict`` hooks that keep masked weights at zero; attach/detach."""
from __future__ import annotations

import re
import weakref
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import MASK_SUFFIX, GATES, WeightSparsity, _round_half_up, erdos_renyi_densities

_NAME_RE = re.compile(r"^weight_(ih|hh|hr)(?:_l(\d+))?(_reverse)?$")


@dataclass(frozen=True)
class _Matrix:
    name: str  # parameter name, e.g. "weight_hh_l1_reverse"
    kind: str  # "ih" | "hh" | "hr"
    layer: int
    direction: str  # "forward" | "reverse"
    rows: int
    cols: int
    hidden: int  # rows per gate (hidden_size) for ih/hh

    @property
    def gated(self) -> bool:
        return self.kind in ("ih", "hh")

    def groups(self, per_gate: bool) -> int:
        return 4 if (per_gate and self.gated) else 1

    def fans(self) -> tuple[int, int]:
        """(n_k, n_{k-1}) of the Erdos-Renyi formula: a gate's output units and its inputs."""
        return (self.hidden if self.gated else self.rows), self.cols


def _lstm_matrices(module: nn.Module) -> list[_Matrix]:
    out = []
    for name, p in module.named_parameters(recurse=False):
        m = _NAME_RE.match(name)
        if m is None or p.dim() != 2:
            continue
        kind, layer, rev = m.group(1), m.group(2), m.group(3)
        out.append(
            _Matrix(
                name=name, kind=kind, layer=int(layer or 0),
                direction="reverse" if rev else "forward",
                rows=p.shape[0], cols=p.shape[1], hidden=module.hidden_size,
            )
        )
    return out


def _check_module(module: nn.Module, fn: str) -> None:
    if not isinstance(module, (nn.LSTM, nn.LSTMCell)):
        raise TypeError(f"{fn} expects an nn.LSTM or nn.LSTMCell, got {type(module).__name__}")


def _masked_matrices(module: nn.Module) -> list[_Matrix]:
    names = getattr(module, "_weight_sparsity_params", ())
    return [m for m in _lstm_matrices(module) if m.name in names]


def _mask_of(module: nn.Module, mat: _Matrix) -> Tensor:
    return getattr(module, mat.name + MASK_SUFFIX)


class _Blocks:
    """Block view of one matrix: block scores and block masks as ``(groups, n)`` tensors."""

    def __init__(self, mat: _Matrix, block: tuple[int, int], per_gate: bool):
        self.mat = mat
        self.br, self.bc = block
        self.nr, self.nc = mat.rows // self.br, mat.cols // self.bc
        self.G = mat.groups(per_gate)

    def _view4(self, t: Tensor) -> Tensor:
        return t.reshape(self.nr, self.br, self.nc, self.bc)

    def scores(self, w: Tensor) -> Tensor:
        """L2 norm of every block (``|w|`` for 1x1), float64, shape ``(G, n)``."""
        s = self._view4(w.detach().to(torch.float64)).pow(2).sum(dim=(1, 3)).sqrt()
        return s.reshape(self.G, -1)

    def block_mask(self, mask: Tensor) -> Tensor:
        """A block is active if any of its entries is (masks are block-constant by construction)."""
        return self._view4(mask).any(dim=3).any(dim=1).reshape(self.G, -1)

    def expand(self, bmask: Tensor) -> Tensor:
        m = bmask.reshape(self.nr, self.nc)
        return m.repeat_interleave(self.br, dim=0).repeat_interleave(self.bc, dim=1)


def _validate_blocks(module: nn.Module, mats: list[_Matrix], config: WeightSparsity) -> None:
    br, bc = config.block
    for mat in mats:
        rows_unit = mat.hidden if mat.gated else mat.rows
        if rows_unit % br or mat.cols % bc:
            raise ValueError(
                f"WeightSparsity.block={config.block} does not tile {mat.name} of "
                f"{type(module).__name__} (shape {mat.rows}x{mat.cols}, gate rows {rows_unit}): "
                "block[0] must divide the rows of one gate and block[1] the columns"
            )


def _mix_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def _initial_block_masks(
    mats: list[_Matrix], config: WeightSparsity, device, name: str
) -> list[Tensor]:
    """Initial block masks ``(G, n)``: all ones for gradual, the sparse topology for DST."""
    blocks = [_Blocks(m, config.block, config.per_gate) for m in mats]
    if config.method == "gradual" or not config.target_sparsity:
        return [torch.ones(b.G, b.nr * b.nc // b.G, dtype=torch.bool, device=device) for b in blocks]
    s = config.target_sparsity
    if config.init == "uniform":
        dens = [1.0 - s] * len(mats)
    else:
        dens = erdos_renyi_densities([(*m.fans(), m.rows * m.cols) for m in mats], s)
    gen = torch.Generator().manual_seed(_mix_seed(config.seed, "init:" + name))
    out = []
    for b, d in zip(blocks, dens):
        n = b.nr * b.nc // b.G
        keep = min(n, max(1, _round_half_up(d * n)))
        bm = torch.zeros(b.G, n, dtype=torch.bool)
        for g in range(b.G):
            bm[g, torch.randperm(n, generator=gen)[:keep]] = True
        out.append(bm.to(device))
    return out


# -- gradient hooks --------------------------------------------------------------------
# id(parameter) -> (weakref to it, hook handle). Hooks do not survive deepcopy/pickling
# (PyTorch drops tensor hooks), so the schedulers re-install them; this map keeps that
# idempotent. (Keyed by id: tensors compare element-wise, so no WeakKeyDictionary.)
_GRAD_HOOKS: dict[int, tuple[Any, Any]] = {}


def _make_grad_hook(module: nn.Module, mask_name: str):
    ref = weakref.ref(module)

    def hook(grad: Tensor) -> Tensor:
        mod = ref()
        if mod is None or not hasattr(mod, mask_name):
            return grad
        return grad.masked_fill(~getattr(mod, mask_name), 0)

    return hook


def _hooked(p: Tensor) -> bool:
    entry = _GRAD_HOOKS.get(id(p))
    return entry is not None and entry[0]() is p


def _install_grad_hooks(module: nn.Module) -> None:
    for mat in _masked_matrices(module):
        p = getattr(module, mat.name)
        if _hooked(p) or not p.requires_grad:
            continue
        key = id(p)
        ref = weakref.ref(p, lambda _r, k=key: _GRAD_HOOKS.pop(k, None))
        _GRAD_HOOKS[key] = (ref, p.register_hook(_make_grad_hook(module, mat.name + MASK_SUFFIX)))


def _install_grad_hooks_pre_forward(module: nn.Module, args) -> None:
    """Forward pre-hook: a parameter unfrozen after the masks were attached gets its mask
    gradient hook before the forward that produces its gradient."""
    _install_grad_hooks(module)


def _remove_grad_hooks(module: nn.Module) -> None:
    for mat in _masked_matrices(module):
        p = getattr(module, mat.name)
        if _hooked(p):
            _GRAD_HOOKS.pop(id(p))[1].remove()


# -- load_state_dict hooks (module-level functions so the module stays picklable) --------
def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Fill mask keys a checkpoint lacks: from the non-zero blocks of the checkpoint's weight,
    or, if the weight is not in it either, keep the current mask."""
    cfg = getattr(module, "weight_sparsity", None)
    if cfg is None:
        return
    for mat in _masked_matrices(module):
        key = prefix + mat.name + MASK_SUFFIX
        if key in state_dict:
            continue
        w = state_dict.get(prefix + mat.name)
        cur = _mask_of(module, mat)
        if w is None or tuple(w.shape) != tuple(cur.shape):
            state_dict[key] = cur.clone()
            continue
        b = _Blocks(mat, cfg.block, False)
        state_dict[key] = b.expand(b.block_mask(w != 0)).to(cur.device)


def _load_post_hook(module, incompatible_keys) -> None:
    _apply_masks_to_weights(module)


@torch.no_grad()
def _apply_masks_to_weights(module: nn.Module) -> None:
    for mat in _masked_matrices(module):
        getattr(module, mat.name).masked_fill_(~_mask_of(module, mat), 0)


# ---------------------------------------------------------------------------------------
# attach / detach
# ---------------------------------------------------------------------------------------
def check_weight_sparsity_fits(module: nn.Module, config: WeightSparsity) -> list[_Matrix]:
    """The matrices ``config`` masks in ``module``; ValueError if it selects none or its
    ``block`` does not tile one of them."""
    mats = [m for m in _lstm_matrices(module) if m.kind in config.weights]
    if not mats:
        raise ValueError(
            f"WeightSparsity.weights={config.weights} selects no weight matrix of "
            f"{type(module).__name__} (it has {[m.name for m in _lstm_matrices(module)]})"
        )
    _validate_blocks(module, mats, config)
    return mats


def attach_weight_sparsity(module: nn.Module, config: WeightSparsity, *, name: str = "") -> None:
    """Give an ``nn.LSTM`` / ``nn.LSTMCell`` (or ``SparseLSTM`` / ``SparseLSTMCell``) weight masks.

    Registers a bool buffer ``<param>_mask`` per selected weight matrix (state_dict keys
    ``weight_ih_l0_mask``, ...), zeroes the masked weights, installs gradient hooks that zero
    their gradients (a forward pre-hook also installs them for a parameter unfrozen later,
    before its first gradient), and load-state-dict hooks (a checkpoint without mask keys loads: the
    masks are taken from its non-zero weights). Gradual: masks start all ones. DST: the
    initial sparse topology (uniform or Erdos-Renyi) is drawn from a generator seeded with
    ``config.seed`` and ``name`` (pass the module's qualified name so two LSTMs of one model
    get different topologies; the same on every rank).

    Attaching the same config again is a no-op; a different config raises ``ValueError``
    (call :func:`detach_weight_sparsity` first).
    """
    _check_module(module, "attach_weight_sparsity")
    if not isinstance(config, WeightSparsity):
        raise TypeError(f"attach_weight_sparsity expects a WeightSparsity config, got {type(config).__name__}")
    existing = getattr(module, "weight_sparsity", None)
    if existing is not None:
        if existing == config:
            _install_grad_hooks(module)
            return
        raise ValueError(
            f"{type(module).__name__} already has weight sparsity {existing}; "
            "call detach_weight_sparsity(module) before attaching another config"
        )
    mats = check_weight_sparsity_fits(module, config)
    device = getattr(module, mats[0].name).device
    for mat, bm in zip(mats, _initial_block_masks(mats, config, device, name)):
        b = _Blocks(mat, config.block, config.per_gate)
        module.register_buffer(mat.name + MASK_SUFFIX, b.expand(bm), persistent=True)
    module.weight_sparsity = config
    module._weight_sparsity_params = tuple(m.name for m in mats)
    module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
    module.register_load_state_dict_post_hook(_load_post_hook)
    module.register_forward_pre_hook(_install_grad_hooks_pre_forward)
    _apply_masks_to_weights(module)
    _install_grad_hooks(module)


def detach_weight_sparsity(module: nn.Module) -> None:
    """Remove the masks, hooks and config (the weights keep their zeros)."""
    _check_module(module, "detach_weight_sparsity")
    if getattr(module, "weight_sparsity", None) is None:
        return
    _remove_grad_hooks(module)
    for name in module._weight_sparsity_params:
        delattr(module, name + MASK_SUFFIX)
    for k, h in list(module._load_state_dict_pre_hooks.items()):
        if getattr(h, "hook", h) is _load_pre_hook:
            del module._load_state_dict_pre_hooks[k]
    for k, h in list(module._load_state_dict_post_hooks.items()):
        if h is _load_post_hook:
            del module._load_state_dict_post_hooks[k]
    for k, h in list(module._forward_pre_hooks.items()):
        if h is _install_grad_hooks_pre_forward:
            del module._forward_pre_hooks[k]
    del module.weight_sparsity
    del module._weight_sparsity_params


def strip_weight_masks(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` without the ``*_mask`` keys of weight sparsity, for loading
    into a plain model with ``strict=True`` (``strict=False`` just reports them unexpected)."""
    pat = re.compile(r"(^|\.)weight_(ih|hh|hr)(_l\d+)?(_reverse)?" + MASK_SUFFIX + "$")
    return type(state_dict)((k, v) for k, v in state_dict.items() if not pat.search(k))
