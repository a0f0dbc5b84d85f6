"""Typed errors of kernel generation and loading (no TVM import: the run-time loader uses them too).

The CLI maps each to an exit code and prints the message, which says what to do.
"""
from __future__ import annotations


class CodegenError(Exception):
    """Base class of every error raised by :mod:`rnn_sparsify.codegen`."""

    exit_code = 1


class ToolchainMissing(CodegenError):
    """TVM or nvcc (or a disassembler) is not installed where compiling needs it."""

    exit_code = 3


class BundleError(CodegenError):
    """A kernel bundle is missing, malformed, built for another arch, or fails its hash check."""

    exit_code = 4


class UnsupportedGemm(CodegenError):
    """A GEMM spec that no generator can build (bad sizes, unsupported dtype/arch)."""

    exit_code = 2
