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

Layout (one import direction: config <- masks <- schedulers <- stats; nothing here is imported
by :mod:`rnn_sparsify.config`, which finds :class:`WeightSparsity` by its module name):

* :mod:`.config`: :class:`WeightSparsity` and the schedules as plain functions;
* :mod:`.masks`: the weight matrices of an LSTM, gate-aware blocks and mask selection, the mask
  buffers and hooks, :func:`attach_weight_sparsity` / :func:`detach_weight_sparsity`;
* :mod:`.schedulers`: :class:`GradualPruningScheduler`, :class:`DSTScheduler` (mask broadcast
  under DDP), :class:`DenseAfterSparse`;
* :mod:`.stats`: :func:`weight_sparsity_stats` and its table.
"""
from __future__ import annotations

from .config import (  # noqa: F401 - every name of the former module stays importable here
    GATES,
    _METHODS,
    _INITS,
    _WEIGHT_KINDS,
    MASK_SUFFIX,
    _GRADUAL_ONLY,
    _DST_ONLY,
    _round_half_up,
    _is_int,
    _is_num,
    gradual_theta,
    _MAX_PAPER_END_RATIO,
    paper_end_ratio,
    gradual_threshold,
    dst_prune_rate,
    erdos_renyi_densities,
    WeightSparsity,
)
from .masks import (  # noqa: F401 - every name of the former module stays importable here
    _NAME_RE,
    _Matrix,
    _lstm_matrices,
    _check_module,
    _masked_matrices,
    _mask_of,
    _Blocks,
    _validate_blocks,
    _mix_seed,
    _initial_block_masks,
    _GRAD_HOOKS,
    _make_grad_hook,
    _hooked,
    _install_grad_hooks,
    _install_grad_hooks_pre_forward,
    _remove_grad_hooks,
    _load_pre_hook,
    _load_post_hook,
    _apply_masks_to_weights,
    check_weight_sparsity_fits,
    attach_weight_sparsity,
    detach_weight_sparsity,
    strip_weight_masks,
)
from .schedulers import (  # noqa: F401 - every name of the former module stays importable here
    _unwrap,
    _key,
    _MaskScheduler,
    GradualPruningScheduler,
    DSTScheduler,
    _quantile,
    DenseAfterSparse,
)
from .stats import (  # noqa: F401 - every name of the former module stays importable here
    weight_sparsity_stats,
    collect_weight_sparsity_stats,
    format_weight_sparsity_stats,
)

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
