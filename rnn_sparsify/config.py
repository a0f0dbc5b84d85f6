"""Sparsity configurations: small frozen dataclasses, validated on construction.

Each config is a value: hashable, comparable, and round-trips through ``to_dict`` /
``config_from_dict`` so it can be stored next to a checkpoint. ``sparsify`` dispatches on
the config's type.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar


def plain_scalar(value: Any) -> Any:
    """``value`` as a Python ``int``/``float`` if it is a numeric scalar of another type
    (``np.float32(0.5)``, ``np.int64(4)``), else unchanged. Configs store plain numbers so
    that every numeric type is accepted alike and ``to_dict`` stays JSON-serialisable."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def normalise_scalars(obj: Any, names: tuple[str, ...]) -> None:
    """Replace the fields ``names`` of a frozen dataclass by :func:`plain_scalar` of them."""
    for name in names:
        object.__setattr__(obj, name, plain_scalar(getattr(obj, name)))


def _check_prob(cls: str, name: str, value: float, *, allow_one: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{cls}.{name} must be a number in [0, 1), got {value!r}")
    hi_ok = value <= 1 if allow_one else value < 1
    if not (0 <= value and hi_ok):
        rng = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{cls}.{name} must be in {rng}, got {value!r}")


def _check_pos_int(cls: str, name: str, value: int, *, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{cls}.{name} must be {what} integer, got {value!r}")


def kept_count(n: int, p: float) -> int:
    """Number of units kept per time step when dropping with probability ``p`` out of ``n``.

    The count is *exact*, not binomial: ``round((1 - p) * n)``, clamped to ``[1, n]``. Every
    step keeps the same number of units, so every sparse GEMM has a static shape (CUDA
    graphs, persistent kernels and batched-over-time launches need that). The kept units are
    drawn uniformly without replacement; inverted scaling multiplies kept values by
    ``n / kept`` so the expectation of every unit is preserved exactly.
    """
    if p <= 0:
        return n
    return min(n, max(1, int(math.floor((1.0 - p) * n + 0.5))))


@dataclass(frozen=True)
class StructuredDropout:
    """Structured dropout of Sarma et al. 2021, Case III (NR + RH + ST).

    One mask per time step, shared by every sequence of the batch, fresh at every step:

    * ``p_input`` (NR): drops units of the layer input ``x_t`` (for layers > 0 this is the
      inter-layer dropout). The input GEMM skips the dropped columns of ``x_t`` and of
      ``W_ih`` (input sparsity); backward-data computes ``dx_t`` only at kept units (output
      sparsity); the weight gradient touches only kept columns of ``W_ih``.
    * ``p_recurrent`` (RH): drops units of ``h_{t-1}`` where it enters the recurrent GEMM
      (the state carried to the next step and returned to the caller is *not* dropped).
      Same three savings on ``W_hh``.

    The number of units kept per step is exact (see :func:`kept_count`), so masks have a
    static shape. Training only: in ``eval()`` no dropout is applied.
    """

    p_input: float = 0.0
    p_recurrent: float = 0.0

    kind: ClassVar[str] = "structured_dropout"

    def __post_init__(self) -> None:
        normalise_scalars(self, ("p_input", "p_recurrent"))
        _check_prob("StructuredDropout", "p_input", self.p_input)
        _check_prob("StructuredDropout", "p_recurrent", self.p_recurrent)

    @property
    def active(self) -> bool:
        return self.p_input > 0 or self.p_recurrent > 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


_GGS_MODES = ("coarse", "fine", "meprop")


@dataclass(frozen=True)
class GateGradientSparsity:
    """Structured sparsity of the gate gradient ``dnet`` (N x 4H) in the LSTM backward pass
    (Zhu et al. 2018). The sparse ``dnet`` feeds all four backward GEMMs (dx, dh, dW, dU) and
    the bias gradient. The forward pass is unchanged.

    Modes (construct with the class methods):

    * ``coarse`` (``GateGradientSparsity.coarse(P=4, R=8, S=4)``): the 4H columns are cut
      into slices of ``P`` consecutive columns; every ``R`` consecutive slices form a region;
      in each region the ``S`` slices with the smallest L2 norm are dropped. Dropped fraction
      ``S / R``. If the number of slices ``4H / P`` is not a multiple of ``R``, the last
      region has ``r < R`` slices and drops ``floor(S * r / R)`` of them.
    * ``fine`` (``GateGradientSparsity.fine(My=8, Mx=4, K=4)``): each ``N x Mx`` column slice
      is cut into ``My x Mx`` sub-matrices along the batch; the ``K`` smallest (L2) of each
      slice are dropped. Dropped fraction ``K / (N / My)``. Batch rule (documented in
      ``docs/semantics.md``): at a step with ``N_t`` rows, a slice has ``ceil(N_t / My)``
      sub-matrices; a last, partial one of ``r < My`` rows is scored by its L2 norm times
      ``sqrt(My / r)`` (its RMS on the scale of a full block); the step drops
      ``floor(K * N_t / N_0)`` sub-matrices per slice, ``N_0`` being the largest batch of the
      sequence (so ``K`` exactly when ``N_t = N_0``, proportionally fewer as a packed batch
      shrinks).
    * ``meprop`` (``GateGradientSparsity.meprop(keep=0.5)``): the baseline of meProp (Sun et
      al. 2017) in its "unified top-k" form: the ``round(keep * 4H)`` columns with the largest
      sum of ``|dnet|`` over the batch are kept, all others dropped.

    Ties are broken by position: among equal scores the lower index is dropped first.
    Non-finite scores (NaN, inf) rank as the largest, so they are kept and reach the loss
    scaler instead of being hidden.
    """

    mode: str = "coarse"
    P: int = 4
    R: int = 8
    S: int = 4
    My: int = 8
    Mx: int = 4
    K: int = 4
    keep: float = 0.5

    kind: ClassVar[str] = "gate_gradient_sparsity"

    def __post_init__(self) -> None:
        normalise_scalars(self, ("P", "R", "S", "My", "Mx", "K", "keep"))
        cls = "GateGradientSparsity"
        if self.mode not in _GGS_MODES:
            raise ValueError(f"{cls}.mode must be one of {_GGS_MODES}, got {self.mode!r}")
        for name in ("P", "R", "My", "Mx"):
            _check_pos_int(cls, name, getattr(self, name))
        _check_pos_int(cls, "S", self.S, allow_zero=True)
        _check_pos_int(cls, "K", self.K, allow_zero=True)
        if self.S >= self.R and self.mode == "coarse":
            raise ValueError(
                f"{cls}.S must be smaller than R (S={self.S}, R={self.R}): "
                "dropping every slice of a region leaves no gradient"
            )
        if self.S > self.R:
            raise ValueError(f"{cls}.S must be <= R, got S={self.S}, R={self.R}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not (
            0 < self.keep <= 1
        ):
            raise ValueError(f"{cls}.keep must be in (0, 1], got {self.keep!r}")

    # -- constructors for the three modes ------------------------------------------------
    @classmethod
    def coarse(cls, P: int = 4, R: int = 8, S: int = 4) -> "GateGradientSparsity":
        return cls(mode="coarse", P=P, R=R, S=S)

    @classmethod
    def fine(cls, My: int = 8, Mx: int = 4, K: int = 4) -> "GateGradientSparsity":
        return cls(mode="fine", My=My, Mx=Mx, K=K)

    @classmethod
    def meprop(cls, keep: float = 0.5) -> "GateGradientSparsity":
        return cls(mode="meprop", keep=keep)

    def validate_for(self, hidden_size: int, owner: str = "LSTM") -> None:
        """Check the config against a layer of ``hidden_size`` units (4H gate columns)."""
        cols = 4 * hidden_size
        if self.mode == "coarse" and cols % self.P:
            raise ValueError(
                f"GateGradientSparsity.P={self.P} does not divide 4*hidden_size={cols} of {owner}"
            )
        if self.mode == "fine" and cols % self.Mx:
            raise ValueError(
                f"GateGradientSparsity.Mx={self.Mx} does not divide 4*hidden_size={cols} of {owner}"
            )

    @property
    def nominal_drop_fraction(self) -> float | None:
        """Fraction of ``dnet`` dropped (fine mode depends on the batch: None)."""
        if self.mode == "coarse":
            return self.S / self.R
        if self.mode == "meprop":
            return 1.0 - self.keep
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        keep = {"coarse": ("P", "R", "S"), "fine": ("My", "Mx", "K"), "meprop": ("keep",)}[
            self.mode
        ]
        return {"kind": self.kind, "mode": self.mode, **{k: d[k] for k in keep}}


CONFIG_TYPES: dict[str, type] = {
    StructuredDropout.kind: StructuredDropout,
    GateGradientSparsity.kind: GateGradientSparsity,
}


# config kinds defined in a module that is imported only when used (no import back from
# here: that module imports this one to register itself)
_REGISTERED_ELSEWHERE: dict[str, str] = {"weight_sparsity": "rnn_sparsify.weight_sparsity.config"}


def register_config(cls: type) -> type:
    """Register a config class so :func:`config_from_dict` can rebuild it."""
    CONFIG_TYPES[cls.kind] = cls
    return cls


def config_from_dict(d: dict[str, Any]):
    """Inverse of ``cfg.to_dict()``."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in CONFIG_TYPES and kind in _REGISTERED_ELSEWHERE:
        importlib.import_module(_REGISTERED_ELSEWHERE[kind])  # registers the class on import
    if kind not in CONFIG_TYPES:
        raise ValueError(f"unknown config kind {kind!r}; known: {sorted(set(CONFIG_TYPES) | set(_REGISTERED_ELSEWHERE))}")
    return CONFIG_TYPES[kind](**d)
