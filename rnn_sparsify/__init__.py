"""rnn_sparsify: structured-sparsity LSTM training and inference on generated GPU kernels.

``import rnn_sparsify`` is cheap: it never imports TVM, and the graph passes, the weight-
sparsity schedulers and the kernel loaders are imported on first use (module ``__getattr__``).
"""
from __future__ import annotations

import importlib

from .config import GateGradientSparsity, StructuredDropout, config_from_dict
from .modules import SparseLSTM, SparseLSTMCell

__version__ = "0.1.0"

# name -> submodule that defines it (imported on first attribute access)
_LAZY = {
    "sparsify": "rnn_sparsify.sparsify",
    "SparsifyReport": "rnn_sparsify.sparsify",
    "WeightSparsity": "rnn_sparsify.weight_sparsity",
    "GradualPruningScheduler": "rnn_sparsify.weight_sparsity",
    "DSTScheduler": "rnn_sparsify.weight_sparsity",
    "DenseAfterSparse": "rnn_sparsify.weight_sparsity",
    "attach_weight_sparsity": "rnn_sparsify.weight_sparsity",
    "detach_weight_sparsity": "rnn_sparsify.weight_sparsity",
    "weight_sparsity_stats": "rnn_sparsify.weight_sparsity",
    "strip_weight_masks": "rnn_sparsify.weight_sparsity",
    "inspect_model": "rnn_sparsify.sparsify",
    "get_report": "rnn_sparsify.sparsify",
}

__all__ = [
    "StructuredDropout",
    "GateGradientSparsity",
    "SparseLSTM",
    "SparseLSTMCell",
    "config_from_dict",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        # bind every lazy name of that module: importing rnn_sparsify.sparsify has just set the
        # package attribute `sparsify` to the submodule, which must not shadow the function
        # (`from rnn_sparsify import inspect_model, sparsify`)
        for other, where in _LAZY.items():
            if where == _LAZY[name]:
                globals()[other] = getattr(module, other)
        return globals()[name]
    raise AttributeError(f"module 'rnn_sparsify' has no attribute {name!r}")
