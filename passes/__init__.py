"""Graph passes of rnn_sparsify (installed as ``rnn_sparsify.passes``).

The path of a model: :func:`~.trace.trace_degrading` (fx where possible, opaque elsewhere)
-> :func:`~.find_lstm.find_lstms` (modules, hand-written cells of :mod:`.match_cell`,
TorchScript) -> :mod:`.rewrite` (cell regions, module swaps) and :mod:`.fuse_dropout`.
:func:`rnn_sparsify.sparsify` runs them as the pipeline of :mod:`.sparsify_passes` (named passes
with the facts each requires and ensures, checked by :mod:`.pipeline`); ``docs/passes.md`` lists
what is matched, ``docs/architecture.md`` the passes.
networkx is imported only when a graph is matched.
"""
from .find_lstm import LSTMSite, find_lstms
from .fuse_dropout import find_dropout_feeds, fuse_dropout
from .match_cell import CellMatch, CellRefusal, match_lstm_cells
from .rewrite import SparseCellRegion, install_graph_forward, rewrite_cell, swap_lstm
from .trace import TraceResult, trace_degrading

__all__ = [
    "trace_degrading", "TraceResult", "find_lstms", "LSTMSite", "match_lstm_cells", "CellMatch",
    "CellRefusal", "rewrite_cell", "swap_lstm", "install_graph_forward", "SparseCellRegion",
    "find_dropout_feeds", "fuse_dropout",
]
