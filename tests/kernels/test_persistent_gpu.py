"""On a GPU, without TVM: the sparse persistent eval kernels of a prebuilt bundle (one
cooperative launch per layer/direction) against ``nn.LSTM`` on the same masked weights.

The bundle comes from ``RNN_SPARSIFY_TEST_BUNDLE`` (``scripts/gpu_check.sh prepare`` builds its
persistent entries: hidden 40, batch 4, float32 and hidden 72, batch 8, bfloat16, every row
bound = the hidden size, so any mask fits).
"""
import os

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cuda.bindings.driver", reason="needs cuda-bindings (pip install 'rnn-sparsify[gpu]')")
BUNDLE = os.environ.get("RNN_SPARSIFY_TEST_BUNDLE")
if not BUNDLE:
    pytest.skip("set RNN_SPARSIFY_TEST_BUNDLE to a kernel bundle (scripts/gpu_check.sh prepare)", allow_module_level=True)

from rnn_sparsify import SparseLSTM  # noqa: E402
from rnn_sparsify.kernels import persistent_eval as pe  # noqa: E402
from rnn_sparsify.weight_sparsity import WeightSparsity, attach_weight_sparsity  # noqa: E402

# (hidden, batch run, dtype, layers, bidirectional, density, atol vs float64 nn.LSTM): fp32
# accumulation everywhere; bf16 stores h_t and c_T in bf16 (2^-8 relative) and its inputs are
# rounded to bf16 before the float64 reference sees them
CASES = [
    (40, 4, torch.float32, 1, False, 0.3, 5e-5),
    (40, 3, torch.float32, 2, True, 0.1, 5e-5),   # batch 3 padded to 4; 2 layers x 2 directions
    (72, 8, torch.bfloat16, 1, False, 0.3, 3e-2),
    (72, 5, torch.bfloat16, 1, False, 0.5, 3e-2),
]


@pytest.fixture(autouse=True)
def bundle():
    pe.use_bundle(BUNDLE)
    pe.set_eval_mode("always")  # the kernels themselves, not the measured routing (its own test below)
    yield
    pe.set_eval_mode(None)
    pe.use_bundle(None)


def _pruned(H, layers, bidirectional, density, dtype, seed):
    torch.manual_seed(seed)
    m = SparseLSTM(H // 2, H, layers, bidirectional=bidirectional)
    attach_weight_sparsity(m, WeightSparsity("dst", total_steps=10, target_sparsity=1 - density,
                                             weights=("ih", "hh")))
    with torch.no_grad():
        for n in m._flat_weights_names:
            if n.startswith("weight_hh"):
                getattr(m, n)[7] = 0  # a gate row without non-zeros
    return m.to("cuda", dtype).eval()


@pytest.mark.parametrize("H,B,dtype,layers,bidir,density,atol", CASES)
def test_persistent_kernel_matches_nn_lstm(H, B, dtype, layers, bidir, density, atol):
    m = _pruned(H, layers, bidir, density, dtype, seed=H + B)
    x = torch.randn(9, B, H // 2, device="cuda", dtype=dtype)
    D = 2 if bidir else 1
    h0 = torch.randn(layers * D, B, H, device="cuda", dtype=dtype) * 0.5
    c0 = torch.randn(layers * D, B, H, device="cuda", dtype=dtype)
    with torch.inference_mode():
        out, (hn, cn) = m(x, (h0, c0))
    assert m.last_path == "persistent_eval", m.last_eval_reason
    assert m.last_eval_reasons == [("tvm_cuda_persistent_eval", "used")]  # rule 1 of the eval rule list
    ref_m = nn.LSTM(H // 2, H, layers, bidirectional=bidir).double().cuda()
    ref_m.load_state_dict({k: v.double() for k, v in m.state_dict().items() if not k.endswith("_mask")})
    with torch.no_grad():
        ref, (rh, rc) = ref_m(x.double(), (h0.double(), c0.double()))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)
    torch.testing.assert_close(hn.double(), rh, rtol=0, atol=atol)
    torch.testing.assert_close(cn.double(), rc, rtol=0, atol=4 * atol)
    # and the same module through cuDNN (the fallback path) agrees too
    with torch.inference_mode():
        dense_out = nn.LSTM.forward(m, x, (h0, c0))[0]
    torch.testing.assert_close(out.double(), dense_out.double(), rtol=0, atol=2 * atol)


def test_repeated_launches_reset_the_barrier():
    m = _pruned(40, 1, False, 0.3, torch.float32, seed=1)
    x = torch.randn(6, 4, 20, device="cuda")
    with torch.inference_mode():
        a = m(x)[0]
        b = m(x)[0]
    assert m.last_path == "persistent_eval" and torch.equal(a, b)


def test_no_matching_entry_falls_back_with_the_reason():
    m = _pruned(48, 1, False, 0.3, torch.float32, seed=2)  # no hidden-48 kernel in the bundle
    with torch.inference_mode():
        m(torch.randn(4, 4, 24, device="cuda"))
    assert m.last_path == "dense" and "no persistent kernel" in m.last_eval_reason
    # the eval rule list: the persistent rule says why, the CPU rule that the input is on CUDA
    (p, why_p), (c, why_c), last = m.last_eval_reasons
    assert (p, c, last) == ("tvm_cuda_persistent_eval", "tvm_cpu_sparse_eval", ("nn.LSTM", "used"))
    assert "no persistent kernel" in why_p and "on CUDA" in why_c


def test_packed_sequence_matches_nn_lstm():
    """A PackedSequence (unsorted lengths, hx in the caller's order): one launch per run of
    equal active rows, against float64 nn.LSTM on the same packed input."""
    from torch.nn.utils.rnn import pack_padded_sequence

    m = _pruned(40, 2, True, 0.3, torch.float32, seed=3)
    lengths = torch.tensor([6, 9, 2, 6])
    x = torch.randn(9, 4, 20, device="cuda")
    h0, c0 = torch.randn(4, 4, 40, device="cuda") * 0.5, torch.randn(4, 4, 40, device="cuda")
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.inference_mode():
        out, (hn, cn) = m(packed, (h0, c0))
    assert m.last_path == "persistent_eval", m.last_eval_reason
    ref_m = nn.LSTM(20, 40, 2, bidirectional=True).double().cuda()
    ref_m.load_state_dict({k: v.double() for k, v in m.state_dict().items() if not k.endswith("_mask")})
    with torch.no_grad():
        ref, (rh, rc) = ref_m(pack_padded_sequence(x.double(), lengths, enforce_sorted=False),
                              (h0.double(), c0.double()))
    assert torch.equal(out.batch_sizes, ref.batch_sizes)
    torch.testing.assert_close(out.data.double(), ref.data, rtol=0, atol=5e-5)
    torch.testing.assert_close(hn.double(), rh, rtol=0, atol=5e-5)
    torch.testing.assert_close(cn.double(), rc, rtol=0, atol=2e-4)


def test_auto_routing_measures_once_and_runs_the_faster_path():
    """RNN_SPARSIFY_PERSISTENT_EVAL=auto (the default) on the real GPU: the first call times the
    kernels against nn.LSTM (CUDA events), the verdict is cached (the timer runs once per key),
    the path that runs is the measured winner, and its output is nn.LSTM's function. No
    assertion about which path wins: that is what the GPU says."""
    pe.set_eval_mode("auto")
    pe.clear_routing()
    calls = []

    def counting(paths, device):
        calls.append(sorted(paths))
        return pe.time_paths(paths, device)

    pe.set_timer(counting)
    try:
        m = _pruned(72, 1, False, 0.3, torch.bfloat16, seed=4)
        x = torch.randn(9, 8, 36, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            outs = [m(x)[0] for _ in range(3)]
            dense = nn.LSTM.forward(m, x)[0]
        assert len(calls) == 1, calls
        (verdict,) = pe.routing_verdicts().values()
        assert verdict.persistent_ms > 0 and verdict.dense_ms > 0
        assert m.last_eval_routing == verdict.text() and "measured" in m.last_eval_routing
        assert m.last_path == ("persistent_eval" if verdict.persistent_wins else "dense"), m.last_eval_reason
        for out in outs:
            torch.testing.assert_close(out.double(), dense.double(), rtol=0, atol=6e-2)
    finally:
        pe.set_timer(None)
        pe.clear_routing()
