"""On a GPU, without TVM: the persistent training loops of a prebuilt bundle (forward with
structured RH dropout, backward-data with coarse selection; one cooperative launch each)
against a float64 autograd LSTM on the CPU with the masks multiplied in and the selection
applied as a gradient hook.

The bundle comes from ``RNN_SPARSIFY_TEST_BUNDLE`` (``scripts/gpu_check.sh prepare`` builds its
training entries: hidden 40, batch 4, 20 kept, float32, coarse 4/8/4; hidden 72, batch 8, 47
kept, bfloat16). Self-contained: ``gpu_check.sh run`` copies it alone into a scratch folder.
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

from rnn_sparsify import gate_selection as gsel  # noqa: E402
from rnn_sparsify.codegen.persistent_train import PersistentTrainSpec  # noqa: E402
from rnn_sparsify.config import GateGradientSparsity  # noqa: E402
from rnn_sparsify.kernels import persistent_train as pt  # noqa: E402

DEV = torch.device("cuda")
_K: dict = {}


def _kernels():
    if "k" not in _K:
        _K["k"] = pt.TrainKernels(BUNDLE, torch.device("cuda", torch.cuda.current_device()))
    return _K["k"]


def _pairs():
    k = _kernels()
    fwd = {(e.spec["hidden_size"], e.spec["batch"], e.spec["keep"], e.spec["dtype"]): e
           for e in k.entries if e.spec["part"] == "fwd"}
    return [(fwd[(e.spec["hidden_size"], e.spec["batch"], e.spec["keep"], e.spec["dtype"])], e)
            for e in k.entries if e.spec["part"] == "bwd"]


def _reference(x, h0, c0, w_ih, w_hh, b, idx, scale, dy, dhn, dcn, coarse):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    leaves = [v.clone().requires_grad_(True) for v in (h0, c0)]
    h, c = leaves
    mask = torch.zeros(T, H, dtype=x.dtype).scatter_(1, idx, 1.0)
    cfg = GateGradientSparsity.coarse(*coarse) if coarse else None
    pres, ys, gates, cs = [], [], [], []
    for t in range(T):
        pre = x[t] @ w_ih.t() + b + (h * mask[t] * scale) @ w_hh.t()
        pre.retain_grad()
        if cfg is not None:
            pre.register_hook(lambda g: g * gsel.dense_mask(tuple(g.shape), cfg, g))
        i, f, g, o = pre.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        h = o * c.tanh()
        pres.append(pre)
        ys.append(h)
        gates.append(torch.cat([i, f, g, o], 1))
        cs.append(c)
    y = torch.stack(ys)
    torch.autograd.backward([y, h, c], [dy, dhn, dcn])
    return (y.detach(), torch.stack(gates).detach(), torch.stack(cs).detach(), torch.stack([p.grad for p in pres]),
            leaves[0].grad, leaves[1].grad)


def test_bundle_has_training_loops():
    assert len(_pairs()) >= 2, "scripts/gpu_check.sh prepare builds two training shapes"
    assert not _kernels().why, _kernels().why  # every grid co-resident on this GPU


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("short_batch", [False, True])
def test_training_loops_match_float64(which, short_batch):
    pairs = sorted(_pairs(), key=lambda p: p[0].spec["hidden_size"])
    if which >= len(pairs):
        pytest.skip("bundle has fewer training shapes")
    ef, eb = pairs[which]
    fs, bs = PersistentTrainSpec.from_dict(ef.spec), PersistentTrainSpec.from_dict(eb.spec)
    H, B, k = fs.hidden_size, fs.batch - short_batch, fs.keep
    # fp32: accumulation order and fast exp/tanh; bf16: W, h and dNet rounded to 2^-8
    atol = 5e-5 if fs.dtype == "float32" else 5e-2
    gen = torch.Generator().manual_seed(H + B)
    f64 = dict(dtype=torch.float64)
    w_ih = torch.randn(4 * H, 9, generator=gen, **f64) / 3
    w_hh = torch.randn(4 * H, H, generator=gen, **f64) / H ** 0.5
    b = torch.randn(4 * H, generator=gen, **f64) * 0.5
    T = 6
    x = torch.randn(T, B, 9, generator=gen, **f64)
    h0, c0 = torch.randn(B, H, generator=gen, **f64) * 0.5, torch.randn(B, H, generator=gen, **f64)
    dy, dhn, dcn = (torch.randn(*s, generator=gen, **f64) for s in ((T, B, H), (B, H), (B, H)))
    idx = torch.stack([torch.sort(torch.randperm(H, generator=gen)[:k]).values for _ in range(T)])
    scale = H / k
    y_r, gates_r, c_r, dnet_r, dh0_r, dc0_r = _reference(x, h0, c0, w_ih, w_hh, b, idx, scale, dy, dhn, dcn,
                                                         bs.coarse)
    if fs.dtype != "float32":  # the kernels see bf16 weights: so does the reference's W_hh
        w_hh_k = w_hh.to(getattr(torch, fs.dtype)).double()
        y_r, gates_r, c_r, dnet_r, dh0_r, dc0_r = _reference(x, h0, c0, w_ih, w_hh_k, b, idx, scale, dy, dhn, dcn,
                                                             bs.coarse)
    dev = DEV
    k_ = _kernels()
    xg = (x @ w_ih.t() + b).to(dev)
    y, hT, cT, saved = pt.layer_forward(xg, h0.to(dev), c0.to(dev), idx.to(dev), scale,
                                        pt.pack_fwd_weights(w_hh.to(dev), fs), fs, k_.launcher(ef))
    tol = dict(rtol=0, atol=atol)
    torch.testing.assert_close(pt.gates(saved, fs).double().cpu(), gates_r, **tol)
    torch.testing.assert_close(y.double().cpu(), y_r, **tol)
    torch.testing.assert_close(cT.double().cpu(), c_r[-1], **tol)
    dnet, dh0, dc0, kept = pt.layer_backward(saved, dy.to(dev), dhn.to(dev), dcn.to(dev),
                                             pt.pack_bwd_weights(w_hh.to(dev), bs), bs, k_.launcher(eb))
    s = max(1.0, dnet_r.abs().max().item())
    torch.testing.assert_close(dnet.double().cpu(), dnet_r, rtol=0, atol=atol * s)
    torch.testing.assert_close(dh0.double().cpu(), dh0_r, rtol=0, atol=atol * max(1.0, dh0_r.abs().max().item()))
    torch.testing.assert_close(dc0.double().cpu(), dc0_r, rtol=0, atol=atol * max(1.0, dc0_r.abs().max().item()))
    if bs.coarse:
        P = bs.coarse[0]
        ref_kept = (dnet_r.reshape(T, B, 4 * H // P, P) != 0).any(dim=(1, 3)).int()
        assert torch.equal(kept.cpu(), ref_kept)
