"""Typed errors of kernel generation and loading (no TVM import: the run-time loader uses them too).

The CLI maps each to an exit code (the table is :data:`rnn_sparsify.target.EXIT_CODES`) and
prints the message, which says what to do. A plain :class:`CodegenError` is an internal error
(exit 1): generated code that does not compile is a bug of the generators.
"""
from __future__ import annotations


class CodegenError(Exception):
    """Base class of every error raised by :mod:`rnn_sparsify.codegen`."""

    exit_code = 1


class ToolchainMissing(CodegenError):
    """TVM or nvcc (or a disassembler) is not installed where compiling needs it."""

    exit_code = 8  # rnn_sparsify.target.EXIT_CODES: this machine lacks what the command needs


class BundleError(CodegenError):
    """A kernel bundle is missing, malformed, built for another arch, or fails its hash check."""

    exit_code = 9


class UnsupportedGemm(CodegenError):
    """A GEMM spec that no generator can build (bad sizes, unsupported dtype/arch)."""

    exit_code = 2
