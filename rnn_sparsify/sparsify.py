"""``sparsify(model, *configs)``: find every LSTM in a model and make it sparse.

This module is the API: :func:`sparsify`, :func:`inspect_model` and the report
(:class:`SparsifyReport`, defined in :mod:`rnn_sparsify.report`). The work is a pipeline of
named passes on one deep copy of the model (the caller's model and the global RNG are left as
they were), each saying what it requires and ensures
(:mod:`rnn_sparsify.passes.sparsify_passes`, listed in ``docs/architecture.md``): copy,
observe, trace, find, capture layers, plan, swap modules, attach weight sparsity, rewrite
cells, fuse dropout, rewrite layers, backends, install forwards, verify, report.

An error while handling one LSTM skips that LSTM (or graph) with the error in the report and
undoes what was done to it. Configs are dispatched by type (one of each at most):
``StructuredDropout``, ``GateGradientSparsity``, ``WeightSparsity``. The result carries a
:class:`SparsifyReport` (``model.rnn_sparsify_report`` / :func:`get_report`).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .report import (GRAPH_REWRITE, MODULE_SWAP, PHASES, REPORT_ATTR, SKIPPED, LSTMEntry, NoLSTMFoundError,  # noqa: F401
                     SparsifyReport, flops_per_token, get_report)

__all__ = ["sparsify", "inspect_model", "SparsifyReport", "LSTMEntry", "get_report", "NoLSTMFoundError",
           "GRAPH_REWRITE", "MODULE_SWAP", "SKIPPED", "REPORT_ATTR"]


def _require_config(configs: tuple) -> None:
    """``sparsify`` changes nothing sparse without a config: refuse, as ``torchao.quantize_`` does."""
    if not configs:
        raise TypeError(
            "sparsify: no config given, so nothing would become sparse. Pass at least one of "
            "StructuredDropout(p_input, p_recurrent), GateGradientSparsity.coarse()/.fine()/.meprop(), "
            "WeightSparsity.gradual(total_steps, ...)/.dst(...), e.g. sparsify(model, StructuredDropout(0.25, 0.25)); "
            "to see what sparsify would find without changing anything, call inspect_model(model) "
            "or run `rnn-sparsify inspect file.py:factory`")



def _run(model, configs, filter_fn, example_inputs, applied: bool, example_kwargs=None):
    from rnn_sparsify.passes.observe import rng_preserved
    from rnn_sparsify.passes.sparsify_passes import run_sparsify

    with rng_preserved(model):
        return run_sparsify(model, configs, filter_fn, example_inputs, applied, example_kwargs)


def sparsify(
    model: nn.Module,
    *configs,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    example_inputs=None,
    example_kwargs: Optional[dict] = None,
) -> nn.Module:
    """A sparse copy of ``model``; ``model`` itself is never modified.

    Args:
        model: any ``nn.Module`` (or an ``nn.LSTM`` itself).
        *configs: at least one, at most one each, of :class:`~rnn_sparsify.StructuredDropout`,
            :class:`~rnn_sparsify.GateGradientSparsity`, ``WeightSparsity`` (with none,
            ``TypeError``: use :func:`inspect_model` to look without changing anything).
        filter_fn: ``filter_fn(module, fqn) -> bool`` chooses the targets (the LSTM module,
            or for a hand-written cell the module that holds it); others are reported as
            skipped.
        example_inputs: a tuple of inputs (or one tensor); run in ``eval()`` under
            ``no_grad`` to record how many tokens each LSTM sees (report FLOPs), how each
            module is called (its traced forward is specialised and guarded accordingly),
            and to verify the rewritten forwards (see the module docstring).
        example_kwargs: keyword inputs of the same call (a dict), if the forward takes any.

    Returns the rewritten model with its :class:`SparsifyReport` as
    ``model.rnn_sparsify_report``. ``eval()`` gives the original numbers; ``state_dict()``
    keys are the original ones (plus mask buffers with ``WeightSparsity``).

    Raises:
        TypeError: no config, an unknown config type, or ``model`` is not a module.
        ValueError: two configs of one type; ``example_inputs`` that do not run.
        NoLSTMFoundError: nothing LSTM-like in the model.
        RuntimeError: every LSTM that was tried failed with an error (listed); an error
            while handling one LSTM otherwise only skips that LSTM (see the report).
    """
    _require_config(configs)
    work, report = _run(model, configs, filter_fn, example_inputs, applied=True, example_kwargs=example_kwargs)
    setattr(work, REPORT_ATTR, report)
    return work


def inspect_model(
    model: nn.Module,
    *configs,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    example_inputs=None,
    example_kwargs: Optional[dict] = None,
) -> SparsifyReport:
    """The report :func:`sparsify` would attach, leaving ``model`` untouched (dry run; configs
    are optional here)."""
    _, report = _run(model, configs, filter_fn, example_inputs, applied=False, example_kwargs=example_kwargs)
    return report
