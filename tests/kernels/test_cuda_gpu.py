"""On a GPU, without TVM: every kernel of a prebuilt bundle against torch, the backend against
the reference backend, and a SparseLSTM training step on both backends.

The bundle comes from ``RNN_SPARSIFY_TEST_BUNDLE`` (``scripts/gpu_check.sh prepare`` builds it).
"""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cuda.bindings.driver", reason="needs cuda-bindings (pip install 'rnn-sparsify[gpu]')")
BUNDLE = os.environ.get("RNN_SPARSIFY_TEST_BUNDLE")
if not BUNDLE:
    pytest.skip("set RNN_SPARSIFY_TEST_BUNDLE to a kernel bundle (scripts/gpu_check.sh prepare)", allow_module_level=True)

from rnn_sparsify.codegen.lstm_spec import LSTMSpec  # noqa: E402
from rnn_sparsify.kernels import REFERENCE, cuda_backend, select_backend  # noqa: E402
from rnn_sparsify.kernels.cuda_loader import LoadedBundle  # noqa: E402

_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# fp32 accumulation of exactly representable products: only the summation order differs
TOL = {"float16": dict(rtol=2e-3, atol=2e-3), "bfloat16": dict(rtol=2e-3, atol=2e-3),
       "float32": dict(rtol=1e-4, atol=1e-4)}


@pytest.fixture(scope="module")
def bundle():
    return LoadedBundle(BUNDLE)


def _kept(steps, blocks, kept, dev):
    return torch.rand(steps, blocks, device=dev).argsort(dim=1)[:, :kept].sort(dim=1).values.to(torch.int32)


def _pos(idx, P):
    return (idx.long()[..., None] * P + torch.arange(P, device=idx.device)).flatten(-2)


def _inputs_and_expect(spec, dev):
    """Fresh random inputs for ``spec`` and the float64 torch result (from the reference semantics)."""
    dt = _DT[spec.dtype]
    shapes = {n: s for n, s, _ in spec.params()}
    ins, kind = {}, spec.kind
    for n, s, d in spec.params():
        if d != "int32" and n != "C":
            ins[n] = torch.randn(s, device=dev).to(dt)
    f = {n: v.double() for n, v in ins.items()}
    T = spec.T
    if kind == "gather_k":
        ins["idx"] = _kept(T, spec.K // spec.P, spec.k // spec.P, dev)
        pos = _pos(ins["idx"], spec.P)
        exp = torch.stack([f["A"][t][:, pos[t]] @ f["W"][:, pos[t]].T for t in range(T)])
    elif kind == "gather_kn":
        rows = cols = None
        if "rows" in shapes:
            ins["rows"] = _kept(T, spec.Nw // spec.P, spec.kc // spec.P, dev)
            rows = _pos(ins["rows"], spec.P)
        if "cols" in shapes:
            ins["cols"] = _kept(T, spec.Kw // spec.Q, spec.kn // spec.Q, dev)
            cols = _pos(ins["cols"], spec.Q)
        W = f["W"]
        exp = torch.stack([f["G"][t] @ W[rows[t] if rows is not None else slice(None)][
            :, cols[t] if cols is not None else slice(None)] for t in range(T)])
    else:
        cols = None
        if "idx" in shapes:
            ins["idx"] = _kept(T, spec.K // spec.P, spec.k // spec.P, dev)
            cols = _pos(ins["idx"], spec.P)
        exp = torch.stack([f["G"][t].T @ f["X"][t][:, cols[t] if cols is not None else slice(None)]
                           for t in range(T)])
    return ins, exp


def test_every_kernel_against_torch(bundle):
    assert bundle.kernels, "bundle has no kernel for this GPU"
    for kernel in bundle.kernels.values():
        spec = kernel.spec
        for _ in range(2):  # fresh inputs, output poisoned each run
            ins, expect = _inputs_and_expect(spec, bundle.device)
            C = torch.full(kernel.out_shape, float("nan"), device=bundle.device)
            bundle.launch(kernel, {**ins, "C": C})
            torch.cuda.synchronize()
            M, N, K = spec.mnk
            assert torch.isfinite(C).all(), f"{kernel.entry.symbol}: output not fully written"
            assert not C[:, M:, :].any() and not C[:, :, N:].any(), f"{kernel.entry.symbol}: padding not zero"
            scale = max(1.0, K ** 0.5)
            tol = {k: v * scale for k, v in TOL[spec.dtype].items()}
            torch.testing.assert_close(C[:, :M, :N].double(), expect, **tol, msg=lambda m: f"{spec}: {m}")


def _lstm_specs(bundle):
    return [LSTMSpec(**d) for d in bundle.manifest.lstms]


def test_backend_is_selected_and_matches_reference(bundle):
    cuda_backend.use_bundle(BUNDLE)
    try:
        dev = bundle.device
        for lstm in _lstm_specs(bundle):
            dt = _DT[lstm.dtype]
            be = select_backend(dev, dt)
            assert be.name == "tvm_cuda", cuda_backend.load_errors()
            for row in cuda_backend.explain(lstm, dev):
                assert row["path"].startswith("kernel"), row
            H, I, B, T = lstm.hidden_size, lstm.input_size, lstm.batch, lstm.seq_len
            for method, spec in lstm.gemms():
                if method == "fwd_input":
                    x, w = torch.randn(T, B, I, device=dev, dtype=dt), torch.randn(4 * H, I, device=dev, dtype=dt)
                    idx = _kept(T, I, spec.k, dev).long()
                    got, exp = be.fwd_input(x, w, idx, 2.0), REFERENCE.fwd_input(x.float(), w.float(), idx, 2.0)
                    torch.testing.assert_close(got.float(), exp, rtol=2e-2, atol=2e-2 * spec.k ** 0.5)
            assert be.summary()["fwd_input"].get("kernel", 0) >= 1 or not any(
                m == "fwd_input" for m, _ in lstm.gemms())
    finally:
        cuda_backend.use_bundle(None)


def _train_step(lstm_spec, seed, dev):
    from rnn_sparsify import SparseLSTM, StructuredDropout, config_from_dict

    dt = _DT[lstm_spec.dtype]
    torch.manual_seed(seed)
    sd = lstm_spec.structured_dropout
    gs = lstm_spec.gate_sparsity
    m = SparseLSTM(lstm_spec.input_size, lstm_spec.hidden_size,
                   structured_dropout=StructuredDropout(sd["p_input"], sd["p_recurrent"]) if sd else None,
                   gate_sparsity=config_from_dict(gs) if gs else None).to(dev, dt).train()
    x = torch.randn(lstm_spec.seq_len, lstm_spec.batch, lstm_spec.input_size, device=dev, dtype=dt, requires_grad=True)
    y, _ = m(x)
    y.float().square().mean().backward()
    return y.detach().float(), x.grad.float(), [p.grad.float() for p in m.parameters()], m.last_backend


def test_sparse_lstm_training_step_matches_reference_backend(bundle):
    dev = bundle.device
    for lstm in _lstm_specs(bundle):
        cuda_backend.use_bundle(None)
        ref = _train_step(lstm, 1234, dev)
        cuda_backend.use_bundle(BUNDLE)
        try:
            got = _train_step(lstm, 1234, dev)
        finally:
            cuda_backend.use_bundle(None)
        assert ref[3] == "reference" and got[3] == "tvm_cuda"
        # bf16/fp16 training step: both backends round the GEMM outputs to the input dtype
        tol = dict(rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(got[0], ref[0], **tol)
        torch.testing.assert_close(got[1], ref[1], **tol)
        for a, b in zip(got[2], ref[2]):
            torch.testing.assert_close(a, b, **tol)
