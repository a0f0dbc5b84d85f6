"""The :class:`WeightSparsity` config and its schedules as plain functions (gradual
thresholds, DST prune rate, Erdos-Renyi densities); no module state. See the package
docstring for the method."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from rnn_sparsify.config import normalise_scalars, register_config

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

    @classmethod
    def static(
        cls,
        total_steps: int,
        target_sparsity: float,
        *,
        init: str = "uniform",
        block: tuple[int, int] = (1, 1),
        per_gate: bool = False,
        weights: tuple[str, ...] = ("ih", "hh"),
        seed: int = 0,
    ) -> "WeightSparsity":
        """A *static* sparse network: the random topology of :meth:`dst` (same ``init``, ``seed``,
        so the same masks and the same number of non-zeros), never pruned or regrown. It is
        ``dst(..., prune_rate=0)`` (``method`` stays ``"dst"``; step it with
        :class:`DSTScheduler`, which then only keeps masked weights and their optimizer state at
        zero): the baseline ST-RNN compares dynamic sparse training against."""
        return cls.dst(total_steps, target_sparsity, init=init, prune_rate=0.0, block=block,
                       per_gate=per_gate, weights=weights, seed=seed)

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
