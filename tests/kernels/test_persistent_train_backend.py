"""The persistent training loops as a layer backend (``PersistentTrainLayerBackend``, the
contract of ``rnn_sparsify/kernels/layer.py``) on the CPU twins, against the float64 oracle
(the per-step composition on the reference GEMMs): outputs, final states and all eight
gradients, forward and reverse direction, input and recurrent structured dropout, coarse
selection."""
from __future__ import annotations

import pytest
import torch

from rnn_sparsify.config import GateGradientSparsity, kept_count
from rnn_sparsify.kernels import persistent_train as pt
from rnn_sparsify.kernels.layer import ComposedLayerBackend
from rnn_sparsify.kernels.reference import ReferenceBackend
from rnn_sparsify.lstm_function import LayerPlan

pytestmark = pytest.mark.tvm


def _backend(H, B, k, grid, coarse):
    from rnn_sparsify.codegen.persistent_train import PersistentTrainSpec, build_twin

    fs = PersistentTrainSpec.make("fwd", H, B, k, "float32", grid)
    bs = PersistentTrainSpec.make("bwd", H, B, k, "float32", grid, coarse=coarse)
    tw = [pt.twin_launcher(build_twin(s)[s.name + "_twin"], s) for s in (fs, bs)]
    return pt.PersistentTrainLayerBackend(fs, bs, *tw)


@pytest.mark.parametrize("H,B,T,p_in,p_rec,coarse,reverse", [
    (26, 3, 4, 0.5, 0.5, (2, 4, 1), False),
    (19, 2, 3, 0.0, 0.3, (), True),
])
def test_layer_backend_matches_float64_oracle(tvm, H, B, T, p_in, p_rec, coarse, reverse):
    gen = torch.Generator().manual_seed(H * 10 + T)
    I = 7
    f64 = dict(dtype=torch.float64)
    x = torch.randn(T, B, I, generator=gen, **f64)
    h0, c0 = torch.randn(B, H, generator=gen, **f64) * 0.5, torch.randn(B, H, generator=gen, **f64)
    w_ih = torch.randn(4 * H, I, generator=gen, **f64) / I ** 0.5
    w_hh = torch.randn(4 * H, H, generator=gen, **f64) / H ** 0.5
    b_ih, b_hh = torch.randn(4 * H, generator=gen, **f64), torch.randn(4 * H, generator=gen, **f64)

    def kept(n, p):
        if not p:
            return None, 1.0
        k = kept_count(n, p)
        return torch.stack([torch.sort(torch.randperm(n, generator=gen)[:k]).values for _ in range(T)]), n / k

    in_idx, in_scale = kept(I, p_in)
    rec_idx, rec_scale = kept(H, p_rec)
    gsp = GateGradientSparsity.coarse(*coarse) if coarse else None
    plan = LayerPlan(in_idx=in_idx, in_scale=in_scale, rec_idx=rec_idx, rec_scale=rec_scale, reverse=reverse,
                     gate_sparsity=gsp)
    dy = torch.randn(T, B, H, generator=gen, **f64)
    dhn, dcn = torch.randn(B, H, generator=gen, **f64), torch.randn(B, H, generator=gen, **f64)
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, plan)
    needs = (True,) * 7 + (False,)

    ref = ComposedLayerBackend(ReferenceBackend())
    y_r, h_r, c_r, saved_r, meta_r = ref.forward(*args)
    g_r = ref.backward(saved_r, meta_r, plan, dy, dhn, dcn, needs)

    be = _backend(H, B, rec_idx.shape[1] if rec_idx is not None else H, 4, coarse)
    assert be.problem(x, w_hh, None, plan) is None
    y, h, c, saved, meta = be.forward(*args)
    g = be.backward(saved, meta, plan, dy, dhn, dcn, needs)
    tol = dict(rtol=0, atol=5e-5)  # float32 kernels vs float64
    torch.testing.assert_close(y, y_r, **tol)
    torch.testing.assert_close(h, h_r, **tol)
    torch.testing.assert_close(c, c_r, **tol)
    names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    for name, a, b in zip(names, g, g_r):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    assert g[7] is None


def test_problem_says_why_not():
    from rnn_sparsify.codegen.persistent_train import PersistentTrainSpec

    fs = PersistentTrainSpec.make("fwd", 16, 4, 8, "float32", 4)
    bs = PersistentTrainSpec.make("bwd", 16, 4, 8, "float32", 4, coarse=(4, 8, 4))
    be = pt.PersistentTrainLayerBackend(fs, bs, None, None)
    x, w = torch.zeros(3, 4, 5), torch.zeros(64, 16)
    fine = LayerPlan(rec_idx=torch.zeros(3, 8, dtype=torch.long), gate_sparsity=GateGradientSparsity(mode="fine"))
    assert "fused selection" in be.problem(x, w, None, fine)
    assert "no gate sparsity" in be.problem(x, w, None, LayerPlan(rec_idx=torch.zeros(3, 8, dtype=torch.long)))
    coarse = LayerPlan(rec_idx=torch.zeros(3, 8, dtype=torch.long), gate_sparsity=GateGradientSparsity.coarse(4, 8, 4))
    assert be.problem(x, w, None, coarse) is None
    assert "do not fit" in be.problem(torch.zeros(3, 5, 5), w, None, coarse)  # batch 5 > 4


def test_gemm_loader_skips_training_entries():
    # a bundle with persistent training entries (gpu_check's) must still load its GEMMs
    from rnn_sparsify.codegen.manifest import KernelEntry, KernelParam, Manifest
    from rnn_sparsify.codegen.persistent_train import PersistentTrainSpec
    from rnn_sparsify.kernels.cuda_loader import choose_entries

    spec = PersistentTrainSpec.make("bwd", 16, 4, 8, "bfloat16", 4)
    e = KernelEntry(key="k", spec=spec.to_dict(), arch="sm_90", symbol=spec.name + "_kernel",
                    params=(KernelParam("Dn", "bfloat16"),), grid=(4, 1, 1), block=(spec.threads, 1, 1),
                    dynamic_smem_bytes=spec.smem_bytes(), source="x.cu", cubin="x.cubin", cubin_sha256="0" * 64,
                    launch="cooperative")
    assert choose_entries(Manifest(kernels=(e,), archs=("sm_90",)), "sm_90") == []
