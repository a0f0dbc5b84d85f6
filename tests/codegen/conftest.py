import pytest


@pytest.fixture(scope="session")
def tvm():
    """TVM configured for the generators; the test is skipped where it is not installed."""
    pytest.importorskip("tvm")
    from rnn_sparsify.codegen.toolchain import import_tvm

    return import_tvm()


@pytest.fixture(scope="session")
def nvcc():
    from rnn_sparsify.codegen.errors import ToolchainMissing
    from rnn_sparsify.codegen.toolchain import nvcc_path

    try:
        return nvcc_path()
    except ToolchainMissing as e:
        pytest.skip(str(e))
