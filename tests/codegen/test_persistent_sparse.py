"""The sparse persistent eval kernel (``codegen/persistent_sparse.py``): its CPU twin (the CUDA
kernel's own macros with the thread loops serial and the grid barrier a phase boundary, built
for LLVM) against float64 ``nn.LSTM`` on fresh random masked weights, through the run time's
format packing and buffer set-up (``rnn_sparsify/kernels/persistent_eval.py``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rnn_sparsify.codegen.errors import UnsupportedGemm
from rnn_sparsify.codegen.persistent_sparse import PersistentSparseSpec, spec_for_arch
from rnn_sparsify.kernels.persistent_eval import layer_forward, pack_ell, row_nnz_max

pytestmark = pytest.mark.tvm

_BUILT: dict = {}


def _twin(spec):
    if spec not in _BUILT:
        from rnn_sparsify.codegen.persistent_sparse import build_twin

        _BUILT[spec] = build_twin(spec)[spec.name + "_twin"]
    return _BUILT[spec]


def _masked_lstm(n_in, H, density, gen, empty_rows=0):
    lstm = nn.LSTM(n_in, H).double()
    with torch.no_grad():
        for w in (lstm.weight_ih_l0, lstm.weight_hh_l0):
            w.mul_((torch.rand(w.shape, generator=gen, dtype=torch.float64) < density).double())
        if empty_rows:  # whole gate rows without a non-zero, in several gates
            rows = torch.randperm(4 * H, generator=gen)[:empty_rows]
            lstm.weight_hh_l0[rows] = 0
        lstm.bias_ih_l0.normal_(generator=gen)
        lstm.bias_hh_l0.normal_(generator=gen)
    return lstm


CASES = [
    # (input, hidden, batch, steps, density, grid, reg_nnz, empty rows, dtype, atol)
    (13, 37, 1, 5, 0.10, 5, 0, 3, "float32", 2e-5),    # 8 units per CTA, the last CTA 5 of 8
    (9, 37, 4, 6, 0.30, 5, 1, 6, "float32", 2e-5),     # 8 non-zeros per thread in "registers"
    (16, 50, 3, 4, 0.30, 7, 0, 0, "float32", 2e-5),    # odd batch, 56 unit slots for 50 units
    (11, 23, 8, 5, 0.30, 3, 0, 2, "float16", 4e-3),    # 16-bit values/h (fp16 rounding); 2 vectors of 4
    (7, 40, 4, 4, 0.15, 8, 8, 1, "bfloat16", 3e-2),    # every non-zero in registers: no shared-memory entries
]
# the packed-word format (value + column in one int32): bf16 and fp16, registers and shared memory
PACKED = [
    (9, 37, 4, 6, 0.30, 5, 1, 6, "bfloat16", 3e-2),
    (11, 23, 8, 5, 0.30, 3, 0, 2, "float16", 4e-3),
    (7, 40, 2, 4, 0.15, 8, 8, 1, "bfloat16", 3e-2),    # all in registers
]


@pytest.mark.parametrize("n_in,H,B,T,density,grid,reg,empty,dtype,atol,packed",
                         [(*c, False) for c in CASES] + [(*c, True) for c in PACKED])
def test_twin_matches_float64_lstm(tvm, n_in, H, B, T, density, grid, reg, empty, dtype, atol, packed):
    gen = torch.Generator().manual_seed(1000 + H * B)
    lstm = _masked_lstm(n_in, H, density, gen, empty)
    w_hh = lstm.weight_hh_l0.detach()
    spec = PersistentSparseSpec.make(H, B, row_nnz_max(w_hh), dtype, grid, reg_nnz=reg, packed=packed)
    assert spec.grid * spec.units >= H
    if reg == 8:
        assert spec.smem_nnz == 0, spec
    x = torch.randn(T, B, n_in, generator=gen, dtype=torch.float64)
    h0 = torch.randn(1, B, H, generator=gen, dtype=torch.float64) * 0.5
    c0 = torch.randn(1, B, H, generator=gen, dtype=torch.float64)
    ref, (hn, cn) = lstm(x, (h0, c0))
    # the run time's split: input projection of all steps outside the kernel
    xg = (x @ lstm.weight_ih_l0.t() + lstm.bias_ih_l0 + lstm.bias_hh_l0).float()
    Wv, Wc = pack_ell(w_hh.float(), spec)
    fn = _twin(spec)
    out, hT, cT = layer_forward(xg, h0[0].float(), c0[0].float(), Wv, Wc, spec,
                                lambda **b: fn(*[b[n] for n, _, _ in spec.params()]))
    # float32 accumulation in another order (and fp16 h/c storage for the 16-bit kernel)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)
    torch.testing.assert_close(hT.double(), hn[0], rtol=0, atol=atol)
    torch.testing.assert_close(cT.double(), cn[0], rtol=0, atol=atol * 4)


def test_spec_validation_and_arch_choice():
    with pytest.raises(UnsupportedGemm, match="multiple of 8"):
        PersistentSparseSpec(64, 4, 12, "float32", 8)
    with pytest.raises(UnsupportedGemm, match="dtype"):
        PersistentSparseSpec(64, 4, 16, "int8", 8)
    s90 = spec_for_arch(2304, 4, 750, "bfloat16", "sm_90")
    s80 = spec_for_arch(2304, 4, 750, "bfloat16", "sm_80")
    assert (s90.units, s90.grid) == (18, 128) and (s80.units, s80.grid) == (22, 105)
    # weights move into registers until the shared memory fits one CTA per SM
    assert s90.reg_nnz > 0 and s90.smem_bytes() + 1024 <= 232448


def test_sm_count_sets_the_grid():
    from rnn_sparsify.codegen.persistent_sparse import grid_for
    from rnn_sparsify.codegen.persistent_train import PersistentTrainRequest

    assert grid_for("sm_90") == 132 and grid_for("sm_80") == 108 and grid_for("sm_90", 114) == 114
    s = spec_for_arch(2304, 4, 750, "bfloat16", "sm_90", sms=114)  # H100 PCIe
    # 2304 units over 114 SMs: 21 per CTA, so 110 CTAs (the reference grid: 18 per CTA, 128 CTAs)
    assert (s.units, s.grid) == (21, 110) and spec_for_arch(2304, 4, 750, "bfloat16", "sm_90").units == 18
    for bad in (0, 133, 2.5, True):
        with pytest.raises(UnsupportedGemm, match="1..132"):
            grid_for("sm_90", bad)
    with pytest.raises(UnsupportedGemm, match="1..108"):
        spec_for_arch(64, 4, 16, "float32", "sm_80", sms=114)
    assert all(s.grid <= 56 for s in PersistentTrainRequest(650, 20, 228, "bfloat16", sms=56).specs("sm_80"))
