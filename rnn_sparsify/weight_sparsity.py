"""Weight sparsity during training for LSTMs.

Two ways to make the input (``weight_ih``) and recurrent (``weight_hh``) weights of an
``nn.LSTM`` / ``nn.LSTMCell`` (or their ``Sparse*`` subclasses) sparse while training, plus the
dense-after-sparse switch for gate-gradient sparsity:

* **gradual** pruning (Narang et al. 2017, "Exploring Sparsity in RNNs"): a mask per weight
  matrix, updated every ``freq`` optimizer steps between ``start_itr`` and ``end_itr`` with a
  monotonically increasing threshold; once masked, a weight stays masked.
* **dst**, dynamic sparse training (Liu et al. 2021, ST-RNN): start sparse (uniform or
  Erdos-Renyi topology), every ``update_every`` steps prune the fraction ``p_t`` of the active
  weights with the smallest magnitude and regrow as many at random inactive positions (at
  value zero), ``p_t`` decayed to 0 by a cosine schedule. The number of active weights of each
  matrix never changes.
* :class:`DenseAfterSparse` (Zhu et al. 2018): gate-gradient sparsity for the first
  ``sparse_fraction`` of the steps, dense for the rest.

Mechanics (why not ``torch.nn.utils.prune`` / parametrizations: they replace the RNN's
parameters by computed tensors, which breaks ``nn.LSTM``'s flat weights and cuDNN; pytorch
issues #65688, #33618):

* the parameters stay plain ``nn.Parameter``\\ s; masks are **bool buffers** named
  ``<param>_mask`` (``weight_ih_l0_mask``...), full-size (one entry per weight, constant over a
  block), so ``state_dict`` saves them and resuming restores them bit for bit;
* masked weights are zeroed in place (``masked_fill_``): at attach time, after every scheduler
  step, and after ``load_state_dict``;
* a gradient hook on each masked parameter zeroes the gradient of masked weights before it is
  accumulated (so gradient clipping and DDP's all-reduce see the sparse gradient);
* the schedulers, stepped after ``optimizer.step()`` like ``torch.optim.lr_scheduler``, update
  the masks, re-apply them to the weights and zero the optimizer state (momentum, Adam moments:
  every state tensor with the parameter's shape) of masked weights.

Gate awareness: PyTorch stores the gates as row blocks ``[i, f, g, o]`` of ``hidden_size``
rows. Blocks (``WeightSparsity.block``) never straddle two gates (``block[0]`` must divide
``hidden_size``), ``per_gate=True`` makes every selection (thresholds, top-k, topology) per
gate so the four gates end with equal sparsity, and :func:`weight_sparsity_stats` reports
sparsity per gate.
"""
from __future__ import annotations

import math
import re
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional

import torch
from torch import Tensor, nn

from .config import normalise_scalars, register_config

__all__ = [
    "WeightSparsity",
    "GradualPruningScheduler",
    "DSTScheduler",
    "DenseAfterSparse",
    "attach_weight_sparsity",
    "detach_weight_sparsity",
    "weight_sparsity_stats",
    "collect_weight_sparsity_stats",
    "format_weight_sparsity_stats",
    "strip_weight_masks",
    "gradual_theta",
    "gradual_threshold",
    "dst_prune_rate",
    "erdos_renyi_densities",
]

GATES = ("i", "f", "g", "o")
_METHODS = ("gradual", "dst")
_INITS = ("uniform", "erdos_renyi")
_WEIGHT_KINDS = ("ih", "hh", "hr")
MASK_SUFFIX = "_mask"

# Fields that belong to one method only, with their defaults: setting one for the other
# method is an error (it would be silently ignored otherwise).
_GRADUAL_ONLY = {
    "start_itr": None,
    "ramp_itr": None,
    "end_itr": None,
    "freq": 100,
    "theta": None,
    "phi": None,
    "q_percentile": 90.0,
    "steps_per_epoch": None,
}
_DST_ONLY = {"init": "uniform", "update_every": 100, "prune_rate": 0.5}


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------
# Schedules as plain functions (the config and the schedulers use these; tests check them)
# ---------------------------------------------------------------------------------------
def gradual_theta(q, start_itr: int, ramp_itr: int, end_itr: int, freq: int):
    """Narang et al.'s heuristic: ``theta = 2 q freq / (2 (ramp - start) + 3 (end - ramp))``.

    With ``phi = 1.5 theta`` the threshold reached at ``end_itr`` is
    ``q * (2 (ramp - start + 1) + 3 (end - ramp + 1)) / (2 (ramp - start) + 3 (end - ramp))``,
    i.e. about ``q``: weights below the ``q`` percentile end up pruned.
    """
    return 2.0 * q * freq / (2.0 * (ramp_itr - start_itr) + 3.0 * (end_itr - ramp_itr))


_MAX_PAPER_END_RATIO = 1.1


def paper_end_ratio(start_itr: int, ramp_itr: int, end_itr: int) -> float:
    """Final threshold of the paper's heuristic divided by ``q``: ``(2 (R+1) + 3 (E+1)) /
    (2 R + 3 E)`` with ``R = ramp - start``, ``E = end - ramp``. The "+1" of each segment makes
    it exceed 1; near 1 for long schedules (1.05 for R = E = 20), 1.5 for R = E = 2."""
    R, E = ramp_itr - start_itr, end_itr - ramp_itr
    return (2.0 * (R + 1) + 3.0 * (E + 1)) / (2.0 * R + 3.0 * E)


def gradual_threshold(itr: int, theta, phi, start_itr: int, ramp_itr: int, freq: int):
    """Threshold ``eps`` at a mask-update iteration ``itr`` (Narang et al. 2017, Algorithm 1).

    ``theta (itr - start + 1) / freq`` before ``ramp_itr``;
    ``(theta (ramp - start + 1) + phi (itr - ramp + 1)) / freq`` from ``ramp_itr`` on.
    """
    if itr < ramp_itr:
        return theta * (itr - start_itr + 1) / freq
    return (theta * (ramp_itr - start_itr + 1) + phi * (itr - ramp_itr + 1)) / freq


def dst_prune_rate(step: int, prune_rate: float, total_steps: int) -> float:
    """ST-RNN's pruning rate at ``step``: ``p_0 (1 + cos(pi step / total_steps)) / 2``.

    ``p_0`` at step 0, 0 at ``total_steps`` (and after).
    """
    if step >= total_steps:
        return 0.0
    return prune_rate * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def erdos_renyi_densities(fans: list[tuple[int, int, int]], sparsity: float) -> list[float]:
    """Per-matrix densities of the Erdos-Renyi topology at overall ``sparsity``.

    ``fans``: one ``(n_k, n_{k-1}, numel)`` per matrix. The density of a matrix is
    ``eps (n_k + n_{k-1}) / (n_k n_{k-1})`` with one ``eps`` for all of them, solved so the
    total number of non-zeros is ``(1 - sparsity) * sum(numel)``. A matrix whose density would
    exceed 1 is made dense and ``eps`` re-solved over the others (as RigL does).
    """
    raw = [(a + b) / (a * b) for a, b, _ in fans]
    numel = [n for _, _, n in fans]
    budget = (1.0 - sparsity) * sum(numel)
    dense: set[int] = set()
    while True:
        rest = [j for j in range(len(fans)) if j not in dense]
        if not rest:
            return [1.0] * len(fans)
        left = budget - sum(numel[j] for j in dense)
        eps = left / sum(raw[j] * numel[j] for j in rest)
        over = [j for j in rest if eps * raw[j] > 1.0]
        if not over:
            return [1.0 if j in dense else eps * raw[j] for j in range(len(fans))]
        dense.add(max(over, key=lambda j: raw[j]))


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------
@register_config
@dataclass(frozen=True)
class WeightSparsity:
    """Weight sparsity of the LSTM input/recurrent weight matrices during training.

    Build with :meth:`gradual` or :meth:`dst`. Fields shared by both methods:

    * ``total_steps``: number of optimizer steps of the training run (the schedules derive
      from it).
    * ``target_sparsity``: gradual: the final sparsity to hit (None: the paper's mode, the
      ``q_percentile`` of each matrix's magnitudes measured at ``start_itr`` sets the
      threshold); dst: the fixed sparsity (required).
    * ``block``: ``(rows, cols)`` of the pruning unit, ``(1, 1)`` for single weights; e.g.
      ``(1, 4)``, ``(4, 4)``, ``(16, 16)`` for tensor-core kernels. A block's score is its L2
      norm. ``block[0]`` must divide ``hidden_size`` (blocks never straddle gates) and
      ``block[1]`` the number of columns of every masked matrix.
    * ``per_gate``: select per gate (each of the 4 gate row blocks gets its own threshold /
      top-k / topology, so every gate ends with the same sparsity) instead of per matrix.
    * ``weights``: which matrices to mask: ``"ih"`` (input), ``"hh"`` (recurrent), ``"hr"``
      (projection, only with ``proj_size``). Biases are never masked.
    * ``seed``: seeds the DST topology and regrowth generators (identical on every rank).

    Gradual (Narang et al. 2017) defaults, derived from ``total_steps``: ``start_itr`` the
    start of the second epoch (``steps_per_epoch``; without it 10% of ``total_steps``),
    ``ramp_itr`` 25% and ``end_itr`` 50% of ``total_steps``, ``freq`` 100, ``theta`` from
    :func:`gradual_theta` with ``q`` the ``q_percentile`` (90th) percentile of the matrix's
    scores, ``phi = 1.5 theta``.

    DST (ST-RNN): ``init`` ``"uniform"`` (every matrix at ``target_sparsity``) or
    ``"erdos_renyi"``; every ``update_every`` steps prune/regrow the fraction
    :func:`dst_prune_rate` (``prune_rate`` cosine-decayed to 0 at ``total_steps``).
    """

    method: str
    total_steps: int
    target_sparsity: Optional[float] = None
    block: tuple[int, int] = (1, 1)
    per_gate: bool = False
    weights: tuple[str, ...] = ("ih", "hh")
    seed: int = 0
    # gradual only
    start_itr: Optional[int] = None
    ramp_itr: Optional[int] = None
    end_itr: Optional[int] = None
    freq: int = 100
    theta: Optional[float] = None
    phi: Optional[float] = None
    q_percentile: float = 90.0
    steps_per_epoch: Optional[int] = None
    # dst only
    init: str = "uniform"
    update_every: int = 100
    prune_rate: float = 0.5

    kind: ClassVar[str] = "weight_sparsity"

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def gradual(
        cls,
        total_steps: int,
        target_sparsity: Optional[float] = None,
        *,
        start_itr: Optional[int] = None,
        ramp_itr: Optional[int] = None,
        end_itr: Optional[int] = None,
        freq: int = 100,
        theta: Optional[float] = None,
        phi: Optional[float] = None,
        q_percentile: float = 90.0,
        steps_per_epoch: Optional[int] = None,
        block: tuple[int, int] = (1, 1),
        per_gate: bool = False,
        weights: tuple[str, ...] = ("ih", "hh"),
    ) -> "WeightSparsity":
        return cls(
            method="gradual", total_steps=total_steps, target_sparsity=target_sparsity,
            start_itr=start_itr, ramp_itr=ramp_itr, end_itr=end_itr, freq=freq, theta=theta,
            phi=phi, q_percentile=q_percentile, steps_per_epoch=steps_per_epoch, block=block,
            per_gate=per_gate, weights=weights,
        )

    @classmethod
    def dst(
        cls,
        total_steps: int,
        target_sparsity: float,
        *,
        init: str = "uniform",
        update_every: int = 100,
        prune_rate: float = 0.5,
        block: tuple[int, int] = (1, 1),
        per_gate: bool = False,
        weights: tuple[str, ...] = ("ih", "hh"),
        seed: int = 0,
    ) -> "WeightSparsity":
        return cls(
            method="dst", total_steps=total_steps, target_sparsity=target_sparsity, init=init,
            update_every=update_every, prune_rate=prune_rate, block=block, per_gate=per_gate,
            weights=weights, seed=seed,
        )

    # -- validation -----------------------------------------------------------------------
    def __post_init__(self) -> None:
        normalise_scalars(self, ("total_steps", "target_sparsity", "seed", "start_itr", "ramp_itr", "end_itr", "freq",
                                 "theta", "phi", "q_percentile", "steps_per_epoch", "update_every", "prune_rate"))
        c = "WeightSparsity"
        if self.method not in _METHODS:
            raise ValueError(f"{c}.method must be one of {_METHODS}, got {self.method!r}")
        if not _is_int(self.total_steps) or self.total_steps < 1:
            raise ValueError(f"{c}.total_steps must be a positive integer, got {self.total_steps!r}")
        if self.target_sparsity is not None:
            t = self.target_sparsity
            if not _is_num(t) or not 0 <= t < 1:
                raise ValueError(f"{c}.target_sparsity must be a number in [0, 1), got {t!r}")
        # normalise list -> tuple (JSON round trip), then check
        if isinstance(self.block, list):
            object.__setattr__(self, "block", tuple(self.block))
        if isinstance(self.weights, (list, str)):
            w = (self.weights,) if isinstance(self.weights, str) else tuple(self.weights)
            object.__setattr__(self, "weights", w)
        if not (
            isinstance(self.block, tuple)
            and len(self.block) == 2
            and all(_is_int(b) and b >= 1 for b in self.block)
        ):
            raise ValueError(f"{c}.block must be a pair of positive integers (rows, cols), got {self.block!r}")
        if (
            not isinstance(self.weights, tuple)
            or not self.weights
            or any(w not in _WEIGHT_KINDS for w in self.weights)
            or len(set(self.weights)) != len(self.weights)
        ):
            raise ValueError(
                f"{c}.weights must be a non-empty tuple of distinct names from {_WEIGHT_KINDS}, "
                f"got {self.weights!r}"
            )
        if not isinstance(self.per_gate, bool):
            raise ValueError(f"{c}.per_gate must be a bool, got {self.per_gate!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"{c}.seed must be a non-negative integer, got {self.seed!r}")
        other = _DST_ONLY if self.method == "gradual" else _GRADUAL_ONLY
        for name, default in other.items():
            if getattr(self, name) != default:
                owner = "dst" if self.method == "gradual" else "gradual"
                raise ValueError(
                    f"{c}.{name} applies to method={owner!r} only (method={self.method!r}), "
                    f"got {getattr(self, name)!r}"
                )
        if self.method == "gradual":
            self._check_gradual(c)
        else:
            self._check_dst(c)

    def _check_gradual(self, c: str) -> None:
        for name in ("start_itr", "ramp_itr", "end_itr"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"{c}.{name} must be a non-negative integer, got {v!r}")
        if not _is_int(self.freq) or self.freq < 1:
            raise ValueError(f"{c}.freq must be a positive integer, got {self.freq!r}")
        if self.steps_per_epoch is not None and (
            not _is_int(self.steps_per_epoch) or self.steps_per_epoch < 1
        ):
            raise ValueError(f"{c}.steps_per_epoch must be a positive integer, got {self.steps_per_epoch!r}")
        if not _is_num(self.q_percentile) or not 0 < self.q_percentile < 100:
            raise ValueError(f"{c}.q_percentile must be in (0, 100), got {self.q_percentile!r}")
        for name in ("theta", "phi"):
            v = getattr(self, name)
            if v is None:
                continue
            if not _is_num(v) or v <= 0:
                raise ValueError(f"{c}.{name} must be a positive number, got {v!r}")
            if self.target_sparsity is not None:
                raise ValueError(
                    f"{c}.{name} cannot be set together with target_sparsity "
                    "(the target mode solves for the threshold itself)"
                )
        start, ramp, end = self.schedule
        derived = " (derived)" if self.start_itr is None else ""
        if end <= start:
            raise ValueError(
                f"{c}.end_itr must be greater than start_itr, got end_itr={end}, start_itr={start}{derived}"
            )
        if not start <= ramp <= end:
            raise ValueError(
                f"{c}.ramp_itr must be in [start_itr, end_itr] = [{start}, {end}], got {ramp}"
            )
        if end > self.total_steps:
            raise ValueError(
                f"{c}.end_itr must be <= total_steps={self.total_steps}, got {end}"
            )
        if self.target_sparsity is None and self.theta is None:
            r = paper_end_ratio(start, ramp, end)
            if r > _MAX_PAPER_END_RATIO:
                raise ValueError(
                    f"{c}: the schedule start_itr={start}, ramp_itr={ramp}, end_itr={end}{derived} is too short for "
                    f"the paper's threshold heuristic (no target_sparsity): its final threshold would be {r:.2f}x "
                    f"the {self.q_percentile:g}th percentile of the weights, which prunes far more than "
                    f"{self.q_percentile:g}% (every weight, for total_steps of a few dozen). Set target_sparsity, "
                    "or a longer schedule (end_itr - start_itr of 50 steps or more), or theta/phi yourself"
                )

    def _check_dst(self, c: str) -> None:
        if self.target_sparsity is None:
            raise ValueError(f"{c}.target_sparsity is required for method='dst' (the fixed sparsity)")
        if self.init not in _INITS:
            raise ValueError(f"{c}.init must be one of {_INITS}, got {self.init!r}")
        if not _is_int(self.update_every) or self.update_every < 1:
            raise ValueError(f"{c}.update_every must be a positive integer, got {self.update_every!r}")
        if not _is_num(self.prune_rate) or not 0 <= self.prune_rate <= 1:
            raise ValueError(f"{c}.prune_rate must be a number in [0, 1], got {self.prune_rate!r}")

    # -- resolved schedule ----------------------------------------------------------------
    @property
    def schedule(self) -> tuple[int, int, int]:
        """Gradual: ``(start_itr, ramp_itr, end_itr)`` with the defaults filled in."""
        T = self.total_steps
        if self.start_itr is not None:
            start = self.start_itr
        elif self.steps_per_epoch is not None:
            start = self.steps_per_epoch
        else:
            start = _round_half_up(0.1 * T)
        ramp = self.ramp_itr if self.ramp_itr is not None else _round_half_up(0.25 * T)
        end = self.end_itr if self.end_itr is not None else _round_half_up(0.5 * T)
        return start, ramp, end

    def is_update_step(self, step: int) -> bool:
        """Whether the scheduler updates the masks after optimizer step ``step`` (1-based)."""
        if self.method == "gradual":
            start, _, end = self.schedule
            return start <= step <= end and ((step - start) % self.freq == 0 or step == end)
        return step % self.update_every == 0 and step < self.total_steps and self.prune_rate > 0

    def update_steps(self) -> list[int]:
        """Every optimizer step after which the masks are updated."""
        return [s for s in range(1, self.total_steps + 1) if self.is_update_step(s)]

    def to_dict(self) -> dict[str, Any]:
        common = ("method", "total_steps", "target_sparsity", "block", "per_gate", "weights", "seed")
        own = _GRADUAL_ONLY if self.method == "gradual" else _DST_ONLY
        d = {"kind": self.kind}
        for k in (*common, *own):
            v = getattr(self, k)
            d[k] = list(v) if isinstance(v, tuple) else v
        return d


# ---------------------------------------------------------------------------------------
# Matrices of an LSTM and their masks
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def _key(fqn: str, pname: str) -> str:
    return f"{fqn}.{pname}" if fqn else pname


class _MaskScheduler:
    """Shared machinery: find the masked modules, step counter, apply masks, DDP sync."""

    method: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        sync_masks: Optional[bool] = None,
        process_group=None,
    ) -> None:
        cls = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{cls}: model must be an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{cls}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = _unwrap(model)
        self.optimizer = optimizer
        self.modules: list[tuple[str, nn.Module]] = [
            (fqn, m)
            for fqn, m in self.model.named_modules()
            if getattr(m, "weight_sparsity", None) is not None and m.weight_sparsity.method == self.method
        ]
        if not self.modules:
            raise ValueError(
                f"{cls}: no module of the model has WeightSparsity(method={self.method!r}); "
                f"apply sparsify(model, WeightSparsity.{self.method}(...)) or attach_weight_sparsity first"
            )
        if sync_masks and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError(f"{cls}: sync_masks=True needs an initialized torch.distributed process group")
        self.sync_masks = sync_masks
        self.process_group = process_group
        self.last_step = 0
        for _, m in self.modules:
            _install_grad_hooks(m)
        self.apply_masks()

    def _entries(self) -> Iterator[tuple[str, nn.Module, _Matrix]]:
        for fqn, m in self.modules:
            for mat in _masked_matrices(m):
                yield fqn, m, mat

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked weights and their optimizer state (momentum, Adam moments...)."""
        for _, m, mat in self._entries():
            p = getattr(m, mat.name)
            inv = ~_mask_of(m, mat)
            p.masked_fill_(inv, 0)
            if self.optimizer is not None:
                for v in self.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.masked_fill_(inv, 0)

    def step(self) -> None:
        """Call once after every ``optimizer.step()``."""
        self.last_step += 1
        changed = self._update(self.last_step)
        if changed and self._syncing():
            self._broadcast_masks()
        self.apply_masks()

    def _update(self, step: int) -> bool:
        raise NotImplementedError

    def _syncing(self) -> bool:
        if self.sync_masks is False:
            return False
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized()

    @torch.no_grad()
    def _broadcast_masks(self) -> None:
        dist = torch.distributed
        src = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        for _, m, mat in self._entries():
            mask = _mask_of(m, mat)
            t = mask.to(torch.uint8)
            dist.broadcast(t, src=src, group=self.process_group)
            mask.copy_(t.bool())

    def sparsity(self) -> float:
        """Fraction of masked entries over all masked matrices of the scheduled modules."""
        tot = off = 0
        for _, m, mat in self._entries():
            mask = _mask_of(m, mat)
            tot += mask.numel()
            off += int((~mask).sum())
        return off / tot

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])


class GradualPruningScheduler(_MaskScheduler):
    """Gradual magnitude pruning (Narang et al. 2017), stepped after ``optimizer.step()``.

    At every update step ``t`` (see :meth:`WeightSparsity.is_update_step`) of a matrix (or of
    each gate of it with ``per_gate``) with block scores ``s`` (masked blocks score 0):

    * paper mode (``target_sparsity=None``): ``q`` = the ``q_percentile`` percentile of ``s``,
      measured once at the first update and kept in :meth:`state_dict`; ``theta`` (or the
      config's) and ``phi = 1.5 theta`` give ``eps = gradual_threshold(t, ...)``;
    * target mode: ``q`` is re-solved at every update so that the threshold at ``end_itr``
      equals the ``target_sparsity`` quantile of the current scores; i.e.
      ``eps_t = r(t) * quantile(s, target)`` with ``r(t) = eps(t) / eps(end_itr)`` of the
      paper's schedule. At ``end_itr`` exactly ``round(target * n)`` blocks are masked.

    Blocks with ``s < eps`` are masked; masked blocks never come back.
    ``last_thresholds`` holds the ``eps`` of the latest update, per ``"<module>.<param>"``.
    """

    method = "gradual"

    def __init__(self, model, optimizer=None, *, sync_masks=None, process_group=None) -> None:
        self._q: dict[str, Tensor] = {}
        self.last_thresholds: dict[str, Tensor] = {}
        super().__init__(model, optimizer, sync_masks=sync_masks, process_group=process_group)

    @torch.no_grad()
    def _update(self, step: int) -> bool:
        changed = False
        for fqn, m, mat in self._entries():
            cfg: WeightSparsity = m.weight_sparsity
            if not cfg.is_update_step(step):
                continue
            start, ramp, end = cfg.schedule
            mask = _mask_of(m, mat)
            b = _Blocks(mat, cfg.block, cfg.per_gate)
            old = b.block_mask(mask)
            s = b.scores(getattr(m, mat.name)) * old
            key = _key(fqn, mat.name)
            if cfg.target_sparsity is None:
                q = self._q.get(key)
                if q is None:
                    q = self._q[key] = _quantile(s, cfg.q_percentile / 100.0)
                theta = cfg.theta if cfg.theta is not None else gradual_theta(q, start, ramp, end, cfg.freq)
                phi = cfg.phi if cfg.phi is not None else 1.5 * theta
                eps = gradual_threshold(step, theta, phi, start, ramp, cfg.freq)
                eps = torch.as_tensor(eps, dtype=torch.float64, device=s.device).expand(b.G).clone()
                new = old & (s >= eps[:, None])
            elif step == end:
                n = s.shape[1]
                n_keep = n - min(n, _round_half_up(cfg.target_sparsity * n))
                order = torch.sort(torch.where(old, s, -1.0), dim=1, descending=True, stable=True).indices
                keep = torch.zeros_like(old)
                keep.scatter_(1, order[:, :n_keep], True)
                new = old & keep
                eps = torch.where(
                    new.any(dim=1), torch.where(new, s, math.inf).amin(dim=1), torch.full_like(s[:, 0], math.inf)
                )
            else:
                r = gradual_threshold(step, 1.0, 1.5, start, ramp, cfg.freq) / gradual_threshold(
                    end, 1.0, 1.5, start, ramp, cfg.freq
                )
                eps = r * _quantile(s, cfg.target_sparsity)
                new = old & (s >= eps[:, None])
            self.last_thresholds[key] = eps
            emptied = (~new.any(dim=1)) & old.any(dim=1)
            if bool(emptied.any()):
                what = mat.name + (f" (gate {'ifgo'[int(emptied.nonzero()[0])]})" if b.G > 1 else "")
                raise ValueError(
                    f"GradualPruningScheduler: the update after step {step} would prune every weight of {fqn or '<root>'}."
                    f"{what} (threshold {float(eps.max()):.4g}); refusing. Lower the sparsity (target_sparsity, theta, phi, "
                    "q_percentile) or lengthen the schedule"
                )
            if not torch.equal(new, old):
                mask.copy_(b.expand(new))
                changed = True
        return changed

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "q": {k: v.clone() for k, v in self._q.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._q = {k: v.clone() for k, v in state_dict.get("q", {}).items()}


class DSTScheduler(_MaskScheduler):
    """Dynamic sparse training (ST-RNN, Liu et al. 2021), stepped after ``optimizer.step()``.

    After every ``update_every``-th step ``t < total_steps``, in every masked matrix (each gate
    with ``per_gate``) with ``nnz`` active blocks: prune the ``k = round(p_t * nnz)`` active
    blocks of smallest L2 norm (ties: lower index first), ``p_t = dst_prune_rate(t)``, and
    activate ``k`` blocks drawn uniformly among the blocks that were inactive before this
    update (``k`` is capped at their number). Regrown weights start at zero and so does their
    optimizer state; ``nnz`` never changes.

    The draws come from one ``torch.Generator`` per module seeded from ``WeightSparsity.seed``
    and the module's name, identical on every rank; under ``torch.distributed`` the masks are
    also broadcast from rank 0 after each update (``sync_masks=False`` turns that off).
    :meth:`state_dict` includes the generator states, so a resumed run draws the same masks.
    """

    method = "dst"

    def __init__(self, model, optimizer=None, *, sync_masks=None, process_group=None) -> None:
        self.last_prune_rate: Optional[float] = None
        super().__init__(model, optimizer, sync_masks=sync_masks, process_group=process_group)
        self._gens = {
            fqn: torch.Generator().manual_seed(_mix_seed(m.weight_sparsity.seed, "regrow:" + fqn))
            for fqn, m in self.modules
        }

    @torch.no_grad()
    def _update(self, step: int) -> bool:
        changed = False
        for fqn, m in self.modules:
            cfg: WeightSparsity = m.weight_sparsity
            if not cfg.is_update_step(step):
                continue
            p = dst_prune_rate(step, cfg.prune_rate, cfg.total_steps)
            self.last_prune_rate = p
            gen = self._gens[fqn]
            for mat in _masked_matrices(m):
                mask = _mask_of(m, mat)
                b = _Blocks(mat, cfg.block, cfg.per_gate)
                old = b.block_mask(mask)
                s = b.scores(getattr(m, mat.name))
                new = old.clone()
                for g in range(b.G):
                    active = old[g]
                    nnz = int(active.sum())
                    k = min(_round_half_up(p * nnz), active.numel() - nnz)
                    if k <= 0:
                        continue
                    order = torch.sort(torch.where(active, s[g], math.inf), stable=True).indices
                    new[g, order[:k]] = False
                    r = torch.rand(active.numel(), generator=gen, dtype=torch.float64).to(s.device)
                    r = torch.where(active, -1.0, r)
                    new[g, torch.topk(r, k).indices] = True
                if not torch.equal(new, old):
                    mask.copy_(b.expand(new))
                    changed = True
        return changed

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "generators": {k: g.get_state() for k, g in self._gens.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for k, st in state_dict.get("generators", {}).items():
            if k not in self._gens:
                raise ValueError(f"DSTScheduler.load_state_dict: unknown module {k!r} (have {sorted(self._gens)})")
            self._gens[k].set_state(st)


def _quantile(x: Tensor, q: float) -> Tensor:
    """Row-wise quantile of ``(G, n)`` with linear interpolation (numpy's default)."""
    n = x.shape[1]
    srt = torch.sort(x, dim=1).values
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    return srt[:, lo] + (pos - lo) * (srt[:, hi] - srt[:, lo])


class DenseAfterSparse:
    """Gate-gradient sparsity for the first ``sparse_fraction`` of training, then dense.

    Zhu et al. 2018 ("dense after sparse"): with 3/4 of the steps sparse and 1/4 dense the
    model matched or beat dense training. Stepped after ``optimizer.step()``: after step
    ``t`` the phase is sparse while ``t < round(sparse_fraction * total_steps)``. It calls
    ``set_gate_sparsity_phase`` on every module of the model that has it.
    """

    def __init__(self, model: nn.Module, total_steps: int, sparse_fraction: float = 0.75) -> None:
        if not _is_int(total_steps) or total_steps < 1:
            raise ValueError(f"DenseAfterSparse.total_steps must be a positive integer, got {total_steps!r}")
        if not _is_num(sparse_fraction) or not 0 <= sparse_fraction <= 1:
            raise ValueError(f"DenseAfterSparse.sparse_fraction must be in [0, 1], got {sparse_fraction!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"DenseAfterSparse: model must be an nn.Module, got {type(model).__name__}")
        self.model = _unwrap(model)
        self.targets = [m for m in self.model.modules() if hasattr(m, "set_gate_sparsity_phase")]
        if not self.targets:
            raise ValueError(
                "DenseAfterSparse: the model has no module with set_gate_sparsity_phase "
                "(sparsify it with a GateGradientSparsity config first)"
            )
        self.total_steps = total_steps
        self.sparse_fraction = float(sparse_fraction)
        self.last_step = 0
        self._apply()

    @property
    def switch_step(self) -> int:
        """First step count at which the phase is dense."""
        return _round_half_up(self.sparse_fraction * self.total_steps)

    @property
    def sparse(self) -> bool:
        return self.last_step < self.switch_step

    def _apply(self) -> None:
        for m in self.targets:
            m.set_gate_sparsity_phase(self.sparse)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "total_steps": self.total_steps, "sparse_fraction": self.sparse_fraction}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])
        self.total_steps = int(state_dict.get("total_steps", self.total_steps))
        self.sparse_fraction = float(state_dict.get("sparse_fraction", self.sparse_fraction))
        self._apply()


# ---------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------
def weight_sparsity_stats(module: nn.Module) -> dict[str, Any]:
    """Per-matrix and per-gate sparsity of one LSTM, and its parameter / FLOP counts vs dense.

    For a masked matrix ``nnz`` counts its active (mask = 1) entries, the storage a sparse
    kernel needs (a regrown DST weight may still be exactly 0); for an unmasked one its
    non-zero entries. ``params`` covers every parameter of the module (biases included);
    ``flops`` the GEMM FLOPs per token summed over layers and directions (``2 * nnz`` of every
    weight matrix; element-wise gate math is not counted). Returns::

        {"method": "gradual" | "dst" | None, "config": dict | None,
         "matrices": [{"name", "kind", "layer", "direction", "shape", "masked",
                       "nnz", "numel", "sparsity", "gates": {"i", "f", "g", "o"} | None}],
         "params": {"dense", "nnz", "ratio"}, "flops": {"dense", "sparse", "ratio"}}
    """
    _check_module(module, "weight_sparsity_stats")
    cfg = getattr(module, "weight_sparsity", None)
    masked = set(getattr(module, "_weight_sparsity_params", ()))
    rows = []
    for mat in _lstm_matrices(module):
        w = getattr(module, mat.name)
        active = _mask_of(module, mat) if mat.name in masked else (w.detach() != 0)
        gates = None
        if mat.gated:
            per = active.reshape(4, mat.hidden, mat.cols)
            gates = {gn: 1.0 - float(per[i].sum()) / per[i].numel() for i, gn in enumerate(GATES)}
        nnz = int(active.sum())
        rows.append(
            {
                "name": mat.name, "kind": mat.kind, "layer": mat.layer, "direction": mat.direction,
                "shape": [mat.rows, mat.cols], "masked": mat.name in masked, "nnz": nnz,
                "numel": active.numel(), "sparsity": 1.0 - nnz / active.numel(), "gates": gates,
            }
        )
    mat_names = {r["name"] for r in rows}
    other = sum(p.numel() for n, p in module.named_parameters(recurse=False) if n not in mat_names)
    dense_w = sum(r["numel"] for r in rows)
    nnz_w = sum(r["nnz"] for r in rows)
    return {
        "method": cfg.method if cfg is not None else None,
        "config": cfg.to_dict() if cfg is not None else None,
        "matrices": rows,
        "params": {"dense": dense_w + other, "nnz": nnz_w + other, "ratio": (nnz_w + other) / (dense_w + other)},
        "flops": {"dense": 2 * dense_w, "sparse": 2 * nnz_w, "ratio": nnz_w / dense_w},
    }


def collect_weight_sparsity_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """:func:`weight_sparsity_stats` of every LSTM / LSTMCell of ``model``, by qualified name."""
    return {
        fqn: weight_sparsity_stats(m)
        for fqn, m in _unwrap(model).named_modules()
        if isinstance(m, (nn.LSTM, nn.LSTMCell))
    }


def format_weight_sparsity_stats(stats: dict[str, Any], name: str = "") -> str:
    """A plain-text table of :func:`weight_sparsity_stats` (for the report and ``inspect``)."""
    head = f"{name or 'LSTM'}: weight sparsity {stats['method'] or 'none'}"
    lines = [
        head,
        f"  {'matrix':<22} {'shape':>11} {'sparsity':>8}   {'i':>5} {'f':>5} {'g':>5} {'o':>5}",
    ]
    for r in stats["matrices"]:
        shape = "x".join(map(str, r["shape"]))
        gates = (
            " ".join(f"{r['gates'][g]:5.1%}" for g in GATES) if r["gates"] is not None else " ".join(["    -"] * 4)
        )
        mark = "" if r["masked"] else " (unmasked)"
        lines.append(f"  {r['name']:<22} {shape:>11} {r['sparsity']:8.1%}   {gates}{mark}")
    p, f = stats["params"], stats["flops"]
    lines.append(f"  params {p['nnz']:,} / {p['dense']:,} dense ({p['ratio']:.1%})")
    lines.append(f"  GEMM FLOPs/token {f['sparse']:,} / {f['dense']:,} dense ({f['ratio']:.1%})")
    return "\n".join(lines)
