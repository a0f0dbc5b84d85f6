"""Kernel backends for the sparse LSTM GEMMs, chosen by a rule list.

A backend is an object with the methods of :class:`ReferenceBackend` (each one a GEMM of the
sparse LSTM, by name). :func:`select_backend` walks the registered rules in order; the first
that returns a backend for the device/dtype wins; the reference backend comes last and
always applies, so a missing kernel never raises.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .reference import ReferenceBackend

__all__ = ["ReferenceBackend", "register_backend_rule", "select_backend", "REFERENCE"]

REFERENCE = ReferenceBackend()

# Each rule: (name, fn(device, dtype) -> backend or None). First non-None wins.
_RULES: list[tuple[str, Callable[[torch.device, torch.dtype], Optional[object]]]] = []


def register_backend_rule(
    name: str, rule: Callable[[torch.device, torch.dtype], Optional[object]], *, first: bool = True
) -> None:
    """Register a backend rule. ``rule`` returns a backend object or ``None`` if it does not apply."""
    global _RULES
    _RULES = [r for r in _RULES if r[0] != name]
    if first:
        _RULES.insert(0, (name, rule))
    else:
        _RULES.append((name, rule))


def unregister_backend_rule(name: str) -> None:
    global _RULES
    _RULES = [r for r in _RULES if r[0] != name]


_ENV_CHECKED = False


def _configure_from_env(device: torch.device) -> None:
    """``RNN_SPARSIFY_KERNELS=<bundle dir>`` enables generated kernels without code changes.

    Checked on the first CUDA selection only, so ``import rnn_sparsify`` stays cheap and a
    CPU-only run never imports the loader.
    """
    global _ENV_CHECKED
    if _ENV_CHECKED or device.type != "cuda":
        return
    _ENV_CHECKED = True
    path = os.environ.get("RNN_SPARSIFY_KERNELS")
    if path:
        from .cuda_backend import use_bundle

        use_bundle(path)


def select_backend(device: torch.device, dtype: torch.dtype):
    """The first applicable backend for ``device``/``dtype``; the reference one otherwise."""
    _configure_from_env(device)
    for _name, rule in _RULES:
        backend = rule(device, dtype)
        if backend is not None:
            return backend
    return REFERENCE


def _register_default_layer_rules() -> None:
    from .cpu_backend import cpu_rule
    from .layer import register_layer_rule

    register_layer_rule("tvm_cpu", cpu_rule, first=False)
    register_layer_rule("persistent_train", _persistent_train_rule, first=False)


def _persistent_train_rule(problem):
    """Imports the CUDA training loops only for a CUDA call (a CPU run never loads them)."""
    if problem.device.type != "cuda":
        return "not a CUDA device"
    from .persistent_train import persistent_train_rule

    return persistent_train_rule(problem)


def _persistent_train_dry(problem):
    if problem.device.type != "cuda":
        return "not a CUDA device"
    from .persistent_train import persistent_train_rule

    return persistent_train_rule.dry(problem)


_persistent_train_rule.dry = _persistent_train_dry


_register_default_layer_rules()
