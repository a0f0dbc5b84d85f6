"""rnn_sparsify: structured-sparsity LSTM training and inference on generated GPU kernels.

``import rnn_sparsify`` is cheap: it never imports TVM, and the graph passes, the weight-
sparsity schedulers and the kernel loaders are imported on first use (module ``__getattr__``).
"""
from __future__ import annotations

import importlib

from .config import GateGradientSparsity, StructuredDropout, config_from_dict
from .modules import SparseLSTM, SparseLSTMCell

# Bound eagerly (cheap: torch and the configs only; the passes load inside the calls): the
# submodule ``rnn_sparsify.sparsify`` shares its name with the function, and once any code has
# imported the submodule, a lazy binding would hand users the module instead of the function.
from .sparsify import SparsifyReport, get_report, inspect_model, sparsify

__version__ = "0.1.0"

# name -> submodule that defines it (imported on first attribute access)
_LAZY = {
    "WeightSparsity": "rnn_sparsify.weight_sparsity",
    "GradualPruningScheduler": "rnn_sparsify.weight_sparsity",
    "DSTScheduler": "rnn_sparsify.weight_sparsity",
    "DenseAfterSparse": "rnn_sparsify.weight_sparsity",
    "attach_weight_sparsity": "rnn_sparsify.weight_sparsity",
    "detach_weight_sparsity": "rnn_sparsify.weight_sparsity",
    "weight_sparsity_stats": "rnn_sparsify.weight_sparsity",
    "strip_weight_masks": "rnn_sparsify.weight_sparsity",
}

__all__ = [
    "StructuredDropout",
    "GateGradientSparsity",
    "SparseLSTM",
    "SparseLSTMCell",
    "config_from_dict",
    "sparsify",
    "inspect_model",
    "get_report",
    "SparsifyReport",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rnn_sparsify' has no attribute {name!r}")
