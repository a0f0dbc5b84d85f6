"""`import rnn_sparsify` stays cheap: no TVM, no graph/codegen machinery until used."""
import subprocess
import sys


def test_import_does_not_pull_tvm_or_passes():
    code = (
        "import sys, rnn_sparsify;"
        "bad = [m for m in ('tvm', 'tvm_ffi', 'rnn_sparsify.codegen.aot', 'networkx') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at package import time: {out.stdout.strip()}"


def test_one_namespace():
    import rnn_sparsify.codegen
    import rnn_sparsify.passes

    assert rnn_sparsify.passes.__name__ == "rnn_sparsify.passes"
    assert rnn_sparsify.codegen.__name__ == "rnn_sparsify.codegen"


def test_sparsify_is_the_function_whatever_was_imported_first():
    code = (
        "import rnn_sparsify.sparsify, rnn_sparsify.passes.rewrite;"
        "from rnn_sparsify import inspect_model, sparsify;"
        "print(callable(sparsify), type(sparsify).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "function"]
