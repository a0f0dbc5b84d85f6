"""Shared helpers of the TVM CPU layer-backend tests (test_cpu_*.py, test_layer_contract.py).

The fast backend computes in float32; the oracle is the per-step composition of the reference
GEMMs (``ComposedLayerBackend(REFERENCE)``) in float64 on the same inputs and the same masks.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from rnn_sparsify.lstm_function import LayerPlan, LSTMLayerFunction, draw_kept_units

# float32 kernels vs the float64 oracle: the observed max error is ~1e-6 of max|ref| (float32
# rounding, accumulated over <= 40-term dot products and T*B-term weight-gradient sums); 2e-5
# leaves a 10-20x margin while still catching any wrong index, scale or gate (those are O(1)).
RTOL = 2e-5

GRAD_NAMES = ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh")
OUT_NAMES = ("y", "h_T", "c_T") + GRAD_NAMES


def need_cpu_kernels():
    """Skip where the CPU kernels cannot be loaded or built here."""
    pytest.importorskip("tvm_ffi")
    from rnn_sparsify.kernels import cpu_runtime

    if not cpu_runtime.tvm_available():
        pytest.skip("apache-tvm is not installed (needed to build the CPU kernels)")
    if not shutil.which("cc") and not shutil.which("gcc") and not shutil.which("clang"):
        pytest.skip("no C compiler for the kernel runtime")


def rel_err(a, ref) -> float:
    ref = ref.double()
    scale = ref.abs().max().item()
    diff = (a.double() - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def make_inputs(T, B, I, H, *, bias=True, seed=0):
    """Fresh float64 inputs of one layer call: x, h0, c0, w_ih, w_hh, b_ih, b_hh, dy, dh_T, dc_T."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    d = {
        "x": r(T, B, I),
        "h0": r(B, H, s=0.5),
        "c0": r(B, H, s=0.5),
        "w_ih": r(4 * H, I, s=0.3),
        "w_hh": r(4 * H, H, s=0.3),
        "b_ih": r(4 * H, s=0.2) if bias else None,
        "b_hh": r(4 * H, s=0.2) if bias else None,
        "dy": r(T, B, H),
        "dh": r(B, H),
        "dc": r(B, H),
    }
    return d


def draw_masks(T, I, H, p_in, p_rec, seed=1):
    torch.manual_seed(seed)
    in_idx, a_in = draw_kept_units(T, I, p_in, "cpu")
    rec_idx, a_rec = draw_kept_units(T, H, p_rec, "cpu")
    return in_idx, a_in, rec_idx, a_rec


def run_layer(backend, dtype, inp, masks, *, reverse=False, cfg=None):
    """One LSTMLayerFunction forward + backward; returns (dict of outputs/grads, plan)."""
    in_idx, a_in, rec_idx, a_rec = masks
    names = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")
    leaves = {}
    for n in names:
        t = inp[n]
        leaves[n] = None if t is None else t.to(dtype).detach().requires_grad_()
    plan = LayerPlan(in_idx=in_idx, in_scale=a_in, rec_idx=rec_idx, rec_scale=a_rec,
                     reverse=reverse, gate_sparsity=cfg, backend=backend, record_selections=True)
    y, h, c = LSTMLayerFunction.apply(*(leaves[n] for n in names), None, plan)
    loss = (y * inp["dy"].to(dtype)).sum() + (h * inp["dh"].to(dtype)).sum() \
        + (c * inp["dc"].to(dtype)).sum()
    loss.backward()
    out = {"y": y.detach(), "h_T": h.detach(), "c_T": c.detach()}
    for gname, n in zip(GRAD_NAMES, names):
        out[gname] = None if leaves[n] is None else leaves[n].grad
    return out, plan


def assert_close_to_ref(got: dict, ref: dict, rtol=RTOL, what=""):
    errs = {}
    for k in OUT_NAMES:
        if ref.get(k) is None:
            assert got.get(k) is None, f"{what}{k}: expected no gradient"
            continue
        assert got[k] is not None, f"{what}{k}: missing"
        assert got[k].shape == ref[k].shape, f"{what}{k}: shape {got[k].shape} != {ref[k].shape}"
        assert torch.isfinite(got[k]).all(), f"{what}{k}: non-finite values"
        errs[k] = rel_err(got[k], ref[k])
    bad = {k: e for k, e in errs.items() if not e <= rtol}
    assert not bad, f"{what}relative errors above {rtol}: {bad} (all: {errs})"
    return errs


def cpu_backend_for(I, H, B, masks, T=5):
    """The TVM CPU layer backend via its rule (asserts that the rule takes the problem)."""
    from rnn_sparsify.kernels.cpu_backend import cpu_rule
    from rnn_sparsify.kernels.layer import LayerProblem

    in_idx, _, rec_idx, _ = masks
    prob = LayerProblem(device=torch.device("cpu"), dtype=torch.float32, input_size=I,
                        hidden_size=H, batch=B, seq_len=T,
                        in_keep=None if in_idx is None else in_idx.shape[1],
                        rec_keep=None if rec_idx is None else rec_idx.shape[1])
    be = cpu_rule(prob)
    assert not isinstance(be, str), f"cpu_rule declined: {be}"
    return be


@pytest.fixture(autouse=False)
def one_thread():
    """Run a test on one intra-op thread (restored afterwards): on a small, busy machine two
    spinning OpenMP threads make each tiny step tens of ms slower. Tests of the parallel paths
    set their own thread counts."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
