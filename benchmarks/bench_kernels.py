"""Kernel benchmark (same as `rnn-sparsify bench`): python benchmarks/bench_kernels.py --bundle B [--out F]."""
import sys

from rnn_sparsify.codegen.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
