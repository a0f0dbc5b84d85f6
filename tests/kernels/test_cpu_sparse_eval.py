"""Weight-sparse eval() on the TVM CPU kernels (rnn_sparsify.kernels.cpu_sparse_eval).

Oracle: ``nn.LSTM.forward`` in float64 on the same (masked) weights, i.e. the dense masked
computation; the kernels compute in float32 with the zero products skipped and another
summation order, so they are held to RTOL (2e-5 of max|ref|; observed ~2e-6).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from rnn_sparsify import SparseLSTM
from rnn_sparsify.kernels import cpu_sparse_eval as cse
from rnn_sparsify.weight_sparsity import WeightSparsity, attach_weight_sparsity

from ._cpu_common import RTOL, need_cpu_kernels, rel_err

pytestmark = pytest.mark.usefixtures("cpu_kernels")


@pytest.fixture
def cpu_kernels(monkeypatch):
    need_cpu_kernels()
    monkeypatch.delenv("RNN_SPARSIFY_CPU_KERNELS", raising=False)
    monkeypatch.delenv("RNN_SPARSIFY_EVAL_DENSITY_LIMIT", raising=False)
    cse._WARNED.clear()


def pruned(I, H, *, layers=1, sparsity=0.9, weights=("ih", "hh"), seed=0, **kw) -> SparseLSTM:
    """A SparseLSTM with WeightSparsity masks whose weights are ``sparsity`` zeros (random)."""
    torch.manual_seed(seed)
    m = SparseLSTM(I, H, layers, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and name.split("_")[1] in weights:
                p[torch.rand(p.shape, generator=g) < sparsity] = 0
    # the masks are taken from the non-zero weights when a checkpoint without masks loads
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    attach_weight_sparsity(m, WeightSparsity("dst", total_steps=100, target_sparsity=sparsity, weights=weights))
    m.load_state_dict(sd, strict=False)
    with torch.no_grad():  # attach drew a random DST topology: put the weights back
        for k, v in sd.items():
            getattr(m, k).copy_(v)
            if k.startswith("weight") and hasattr(m, k + "_mask"):
                getattr(m, k + "_mask").copy_(v != 0)
    return m.eval()


def dense_reference(m: SparseLSTM, *args):
    """nn.LSTM.forward in float64 on a copy of ``m``'s weights (masks stripped)."""
    ref = nn.LSTM(m.input_size, m.hidden_size, m.num_layers, bias=m.bias, batch_first=m.batch_first,
                  bidirectional=m.bidirectional).double().eval()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.endswith("_mask")})

    def d(v):
        if isinstance(v, PackedSequence):
            return v._replace(data=v.data.double())
        if isinstance(v, tuple):
            return tuple(d(t) for t in v)
        return v.double() if isinstance(v, torch.Tensor) else v

    with torch.no_grad():
        return ref(*(d(a) for a in args))


def check_close(out, ref):
    (y, (h, c)), (ry, (rh, rc)) = out, ref
    assert y.dtype == torch.float32 and y.shape == ry.shape and h.shape == rh.shape and c.shape == rc.shape
    for a, b in ((y, ry), (h, rh), (c, rc)):
        assert rel_err(a, b) < RTOL


@pytest.mark.parametrize(
    "I,H,layers,B,T,kw",
    [
        (23, 37, 1, 1, 5, {}),  # hidden not a multiple of 16, batch 1 (padded to 4)
        (40, 48, 2, 3, 7, {}),
        (40, 48, 2, 5, 4, {"batch_first": True}),  # batch 8 kernels
        (17, 33, 2, 19, 6, {"bidirectional": True}),  # batch padded to a vector multiple
        (30, 20, 1, 4, 9, {"bias": False}),
        # dense enough that every accumulator chain sees real non-zeros, at each batch class
        # (4: packed FMAs; 8; 24 = 3 ymm chunks with 5 chains; 32) (the rule is overridden)
        (40, 48, 1, 2, 5, {"sparsity": 0.5}),
        (40, 48, 1, 7, 5, {"sparsity": 0.5}),
        (40, 48, 1, 20, 5, {"sparsity": 0.5}),
        (40, 48, 1, 29, 5, {"sparsity": 0.5}),
    ],
)
def test_matches_dense_masked_lstm(I, H, layers, B, T, kw, monkeypatch):
    if "sparsity" in kw:
        monkeypatch.setenv("RNN_SPARSIFY_EVAL_DENSITY_LIMIT", "1")
    m = pruned(I, H, layers=layers, **kw)
    x = torch.randn(B, T, I) if kw.get("batch_first") else torch.randn(T, B, I)
    with torch.no_grad():
        out = m(x)
    assert m.last_path == "sparse_eval" and m.last_eval_backend == cse.BACKEND
    check_close(out, dense_reference(m, x))
    with torch.no_grad():  # the float32 nn.LSTM path agrees too
        fy = nn.LSTM.forward(m, x)[0]
    assert rel_err(out[0], fy) < RTOL


def test_initial_state_unbatched_and_inference_mode():
    m = pruned(24, 40, layers=2)
    x = torch.randn(6, 3, 24)
    hx = (torch.randn(2, 3, 40), torch.randn(2, 3, 40))
    with torch.inference_mode():
        out = m(x, hx)
    assert m.last_path == "sparse_eval"
    check_close(out, dense_reference(m, x, hx))
    xu = torch.randn(6, 24)
    hu = (torch.randn(2, 40), torch.randn(2, 40))
    with torch.no_grad():
        out = m(xu, hu)
    assert m.last_path == "sparse_eval" and out[0].shape == (6, 40) and out[1][0].shape == (2, 40)
    check_close(out, dense_reference(m, xu, hu))


def test_only_recurrent_weights_masked():
    m = pruned(32, 40, layers=2, weights=("hh",))
    assert (m.weight_ih_l0 != 0).float().mean() > 0.99  # W_ih dense: one dense GEMM
    x = torch.randn(5, 2, 32)
    with torch.no_grad():
        out = m(x)
    assert m.last_path == "sparse_eval"
    check_close(out, dense_reference(m, x))


def test_weight_changes_rebuild_the_format():
    m = pruned(20, 32)
    x = torch.randn(4, 2, 20)
    with torch.no_grad():
        m(x)
        m.weight_hh_l0[m.weight_hh_l0 > 0] *= 0.5  # in place: the version counter moves
        m.bias_ih_l0.add_(1.0)
        out = m(x)
    assert m.last_path == "sparse_eval"
    check_close(out, dense_reference(m, x))
    m2 = copy.deepcopy(m)  # the cache lives outside the module: copies and pickles are clean
    m2.load_state_dict(pruned(20, 32, seed=5).state_dict())
    with torch.no_grad():
        check_close(m2(x), dense_reference(m2, x))


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_isa_builds(isa, monkeypatch):
    from rnn_sparsify.kernels.cpu_runtime import detect_isa

    if isa == "avx2" and detect_isa() == "generic":
        pytest.skip("host has no AVX2")
    monkeypatch.setenv("RNN_SPARSIFY_CPU_ISA", isa)
    m = pruned(19, 21, layers=2)
    x = torch.randn(5, 6, 19)
    with torch.no_grad():
        out = m(x)
    assert m.last_path == "sparse_eval"
    check_close(out, dense_reference(m, x))


def test_padded_csr_round_trip():
    H, n = 7, 11
    w = torch.randn(4 * H, n)
    w[torch.rand_like(w) < 0.7] = 0
    ip, col, val, dens = cse.padded_csr(w, H, scale=3, idx_dtype=torch.int32, pad=8)
    assert dens == pytest.approx(float((w != 0).float().mean()))
    assert torch.all((ip[1:] - ip[:-1]) % 8 == 0)
    back = torch.zeros(4 * H, n)
    for r in range(4 * H):
        for j in range(int(ip[r]), int(ip[r + 1])):
            back[r, int(col[j]) // 3] += val[j]
    inter = w.reshape(4, H, n).transpose(0, 1).reshape(4 * H, n)  # row 4j+g = gate g of unit j
    assert torch.equal(back, inter)


# ---- where the dense nn.LSTM runs instead (exactly nn.LSTM, and the reason is recorded) ------


def _dense_ran(m, out, x, hx=None):
    assert m.last_path == "dense" and m.last_eval_backend == cse.DENSE
    with torch.no_grad():
        ref = nn.LSTM.forward(m, x, hx)
    assert torch.equal(out[0].detach(), ref[0])


def test_grad_needed_runs_dense_with_one_warning():
    m = pruned(12, 16)
    x = torch.randn(3, 2, 12)
    with pytest.warns(RuntimeWarning, match="no_grad"):
        out = m(x)
    assert out[0].requires_grad  # as nn.LSTM in eval(): gradients still flow
    assert "gradients are needed" in m.last_eval_reason
    _dense_ran(m, out, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # once per module


def test_too_dense_runs_dense(monkeypatch):
    m = pruned(12, 16, sparsity=0.5)
    x = torch.randn(3, 2, 12)
    with torch.no_grad():
        out = m(x)
    assert "dense" in m.last_eval_reason and "nn.LSTM's dense kernels are faster" in m.last_eval_reason
    _dense_ran(m, out, x)
    monkeypatch.setenv("RNN_SPARSIFY_EVAL_DENSITY_LIMIT", "1")  # past the break-even: kernels
    with torch.no_grad():
        check_close(m(x), dense_reference(m, x))
    assert m.last_path == "sparse_eval"
    monkeypatch.delenv("RNN_SPARSIFY_EVAL_DENSITY_LIMIT")  # the rule again, formats built or not
    with torch.no_grad():
        out = m(x)
    _dense_ran(m, out, x)


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequences(enforce_sorted, bidirectional):
    """Packed input runs on the kernels: each sequence stops at its own length (h_n, c_n
    taken there), the reverse direction starts at each sequence's own last step, and the
    output is packed like nn.LSTM's (same batch_sizes and indices)."""
    m = pruned(14, 24, layers=2, bidirectional=bidirectional, seed=3)
    lengths = [7, 7, 3, 5, 1] if not enforce_sorted else [7, 6, 4, 4, 1]
    x = torch.randn(7, 5, 14)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    D = 2 if bidirectional else 1
    hx = (torch.randn(2 * D, 5, 24), torch.randn(2 * D, 5, 24))
    for h in (None, hx):
        with torch.no_grad():
            out, (hn, cn) = m(packed, h)
        assert m.last_path == "sparse_eval", m.last_eval_reason
        ref, (rh, rc) = dense_reference(m, packed, h)
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, ref.batch_sizes)
        for a, b in ((out.sorted_indices, ref.sorted_indices), (out.unsorted_indices, ref.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        check_close((out.data, (hn, cn)), (ref.data, (rh, rc)))


@pytest.mark.parametrize("case", ["env_off", "float64", "training", "autocast", "no_masks", "proj"])
def test_fallbacks(case, monkeypatch):
    m = pruned(12, 16)
    x = torch.randn(3, 2, 12)
    if case == "env_off":
        monkeypatch.setenv("RNN_SPARSIFY_CPU_KERNELS", "0")
    if case == "float64":
        m.double()
        x = x.double()
    if case == "training":
        m.train()
    if case == "no_masks":
        from rnn_sparsify.weight_sparsity import detach_weight_sparsity

        detach_weight_sparsity(m)
    if case == "proj":
        m = SparseLSTM(12, 16, proj_size=8).eval()
        attach_weight_sparsity(m, WeightSparsity("dst", total_steps=10, target_sparsity=0.9))
    with torch.no_grad():
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
            assert m.last_path == "dense" and "autocast" in m.last_eval_reason
            return
        out = m(x)
    if case == "training":
        assert m.last_path == "dense"  # training without structured dropout: nn.LSTM
        return
    if case == "no_masks":
        assert m.last_path == "dense"
        return
    _dense_ran(m, out, x)


def test_errors_are_nn_lstm_errors():
    m = pruned(12, 16)
    ref = nn.LSTM(12, 16)
    for bad in (torch.randn(3, 2, 11), torch.randn(2, 3, 2, 12)):
        with pytest.raises((RuntimeError, ValueError)) as ours, torch.no_grad():
            m(bad)
        with pytest.raises((RuntimeError, ValueError)) as theirs, torch.no_grad():
            ref(bad)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError) as ours, torch.no_grad():
        m(torch.randn(3, 2, 12), (torch.zeros(1, 5, 16), torch.zeros(1, 5, 16)))
    with pytest.raises(RuntimeError) as theirs, torch.no_grad():
        ref(torch.randn(3, 2, 12), (torch.zeros(1, 5, 16), torch.zeros(1, 5, 16)))
    assert str(ours.value) == str(theirs.value)


def test_kernels_unavailable_falls_back_with_one_warning(monkeypatch):
    from rnn_sparsify.kernels import cpu_runtime

    def broken(spec):
        raise cpu_runtime.KernelUnavailable("apache-tvm-ffi is not installed")

    monkeypatch.setattr(cpu_runtime, "load_layer", broken)
    monkeypatch.setattr(cse, "_FAILED", {})
    m = pruned(12, 16)
    x = torch.randn(3, 2, 12)
    with pytest.warns(RuntimeWarning, match="unavailable"), torch.no_grad():
        out = m(x)
    assert "unavailable" in m.last_eval_reason
    _dense_ran(m, out, x)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        m(x)


def test_sparsify_trained_model_evaluates_on_the_kernels():
    """End to end: sparsify(model, WeightSparsity DST), a few training steps, then eval."""
    from rnn_sparsify import sparsify
    from rnn_sparsify.weight_sparsity import DSTScheduler

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 24)
            self.rnn = nn.LSTM(24, 32, 2)
            self.out = nn.Linear(32, 50)

        def forward(self, tok):
            return self.out(self.rnn(self.emb(tok))[0])

    torch.manual_seed(0)
    model = sparsify(LM(), WeightSparsity("dst", total_steps=6, target_sparsity=0.9, update_every=2))
    sched = DSTScheduler(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(6):
        tok = torch.randint(0, 50, (8, 4))
        loss = nn.functional.cross_entropy(model(tok).flatten(0, 1), tok.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    tok = torch.randint(0, 50, (8, 4))
    with torch.no_grad():
        logits = model(tok)
    assert model.rnn.last_path == "sparse_eval"
    emb = model.emb(tok).detach()
    ref = dense_reference(model.rnn, emb)
    with torch.no_grad():
        assert rel_err(model.rnn(emb)[0], ref[0]) < RTOL
        assert rel_err(logits, model.out(ref[0].float())) < RTOL


def test_explain_eval_says_what_eval_runs(monkeypatch):
    m = pruned(12, 16)
    text = cse.explain_eval(m)
    assert cse.BACKEND in text and "now 10% dense" in text and "<= 22% dense at batch 2-8" in text
    assert cse.explain_eval(SparseLSTM(12, 16)) == "eval() runs the dense PyTorch path"
    monkeypatch.setenv("RNN_SPARSIFY_CPU_KERNELS", "0")
    assert "RNN_SPARSIFY_CPU_KERNELS=0" in cse.explain_eval(m)
