"""Schedulers stepped after ``optimizer.step()``: gradual pruning, DST, dense-after-sparse;
mask broadcast under DDP (``sync_masks``)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, Optional

import torch
from torch import Tensor, nn

from .config import (WeightSparsity, _is_int, _is_num, _round_half_up, dst_prune_rate, gradual_theta,
                     gradual_threshold)
from .masks import _Blocks, _Matrix, _install_grad_hooks, _mask_of, _masked_matrices, _mix_seed

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
