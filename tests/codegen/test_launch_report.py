"""Static launch facts (``codegen/launch_report.py``): CTAs and K stages of every GEMM of the
README's models, from the specs' tiles; pure arithmetic, no TVM."""
import math

import pytest

from rnn_sparsify.codegen import launch_report as lr
from rnn_sparsify.codegen.gemm_gather import (SEQ_MAX_STAGES, SEQ_TARGET_CTAS, GatherK, GatherKN, Tile, per_step_tile,
                                              rows_tile, sequence_tile)
from rnn_sparsify.codegen.schedule import launch_dims, tensorcore

SPECS = lr.readme_specs()


@pytest.mark.parametrize("name", list(SPECS))
def test_ctas_match_the_schedule_grid(name):
    """``spec.ctas`` is the grid the tensor-core schedule's launch uses; ``k_stages`` the
    padded reduction over ``bk``, cut in ``split_k`` slices that cover K exactly once."""
    for method, g in SPECS[name].gemms():
        grid, _ = launch_dims(g, tensorcore)
        assert g.ctas == math.prod(grid), (method, g)
        _, _, K = g.mnk
        S, bk = g.tile.split_k, g.tile.bk
        assert g.k_stages == math.ceil(max(K, 1) / (bk * S)), (method, g)
        assert g.k_slice * S == g.padded[2] >= K > g.k_slice * (S - 1), (method, g)  # no empty slice


@pytest.mark.parametrize("name", list(SPECS))
def test_per_step_kernels_fill_the_gpu(name):
    """The per-step (T = 1) GEMMs launch >= 100 CTAs (132-SM H100, 108-SM A100); the
    whole-sequence dx (``bwd_data``, T = 35) >= SEQ_TARGET_CTAS CTAs with <= SEQ_MAX_STAGES K
    stages each; the sequence input projection is the whole-row kernel (``rows_tile``: 128 rows
    of 4H, the batch in a 32/64-column tile); ``wgrad`` keeps the default tile."""
    for method, g in SPECS[name].gemms():
        if g.T == 1 or method == "bwd_data":
            assert g.ctas >= (100 if g.T == 1 else SEQ_TARGET_CTAS), (method, g.ctas, g)
            assert g.tile.bm < 64 or g.mnk[0] > 32, (method, g)  # batch 20 not in a 64-row tile
            if g.T > 1:
                assert g.k_stages <= SEQ_MAX_STAGES and g.tile.split_k > 1, (method, g)
        elif method == "fwd_input":
            assert g.kind == "gather_rows_t" and g.tile == rows_tile(g.M) and g.ctas >= SEQ_TARGET_CTAS, g
        else:
            assert g.tile == Tile(), (method, g)


def test_readme_before_after():
    """The numbers docs/codegen.md quotes (650/B20 and 1500/B20, default tile before)."""
    got = {}
    for name in ("650/B20", "1500/B20"):
        for r in lr.launch_rows(SPECS[name]):
            if r["T"] == 1:
                got[name, r["method"]] = (r["ctas"], r["k_stages"], r["split_k"])
    assert got == {("650/B20", "fwd_recurrent"): (164, 3, 4), ("650/B20", "bwd_data"): (126, 4, 21),
                   ("1500/B20", "fwd_recurrent"): (188, 12, 2), ("1500/B20", "bwd_data"): (132, 18, 11)}
    before = {n: (GatherK(T=1, M=20, N=4 * H, K=H, k=H // 2), GatherKN(T=1, M=20, Nw=4 * H, Kw=H, kc=None, kn=H // 2))
              for n, H in (("650", 650), ("1500", 1500))}
    assert [(f.ctas, f.k_stages, b.ctas, b.k_stages) for f, b in before.values()] == [(21, 11, 3, 82), (47, 24, 6, 188)]


def test_sequence_dx_before_after():
    """The whole-sequence dx (T = 35) numbers docs/codegen.md quotes: default tile before,
    ``sequence_tile`` after (batch 20 and 64: same split, CTAs and stages)."""
    got = {}
    for name in SPECS:
        for r in lr.launch_rows(SPECS[name]):
            if r["method"] == "bwd_data" and r["T"] == 35:
                got[name] = (r["tile"], r["split_k"], r["ctas"], r["k_stages"])
    assert got == {"650/B20": ("32x64x32/2x2", 3, 630, 28), "650/B64": ("64x64x32/2x2", 3, 630, 28),
                   "1500/B20": ("32x64x32/2x2", 6, 2520, 32), "1500/B64": ("64x64x32/2x2", 6, 2520, 32)}
    before = [GatherKN(T=35, M=20, Nw=4 * H, Kw=H, kc=None, kn=H // 2) for H in (650, 1500)]
    assert [(b.ctas, b.k_stages) for b in before] == [(105, 82), (210, 188)]


def test_per_step_tile_rule():
    assert per_step_tile(4, 2600, 325) == Tile(bm=16, bn=64, bk=32, warps_m=1, warps_n=2, split_k=4)
    assert per_step_tile(64, 6000, 750).split_k == 2  # 94 tiles: two slices reach 132
    assert per_step_tile(20, 64, 40).split_k == 1  # 2 K stages: no slice below min_stages
    t = per_step_tile(20, 325, 2600)
    assert (t.bm, t.split_k) == (32, 21)


def test_sequence_tile_rule():
    """Split to the CTA target unless that leaves more than SEQ_MAX_STAGES stages per slice
    (then the cap decides); no split when T x tiles already reach the target with few stages."""
    assert sequence_tile(35, 20, 325, 2600).split_k == 3  # 210 CTAs -> 3 slices of 28 stages
    assert sequence_tile(35, 20, 750, 6000).split_k == 6  # target: 2 slices of 94; cap: 6 of 32
    assert sequence_tile(35, 64, 2600, 256).split_k == 1  # 1435 CTAs, 8 stages
    t = sequence_tile(4, 20, 40, 256)
    assert (t.bm, t.bn, t.split_k) == (32, 64, 4) and GatherKN(T=4, M=20, Nw=256, Kw=80, kc=None, kn=40, tile=t).k_stages == 2


def test_report_lists_every_gemm():
    text = lr.report()
    assert text.count("\n") == sum(len(s.gemms()) for s in SPECS.values())
    assert "fwd_recurrent" in text and "bwd_data" in text


def test_one_step_spec_splits_the_input_gemms_too():
    """A one-step spec (cells: ``seq_len = 1``) runs the input GEMMs per step as well."""
    from rnn_sparsify.codegen.lstm_spec import LSTMSpec

    spec = LSTMSpec(input_size=300, hidden_size=650, batch=20, seq_len=1,
                    structured_dropout={"p_input": 0.5, "p_recurrent": 0.5})
    got = {(m, g.mnk): g.ctas for m, g in spec.gemms() if g.kind in ("gather_k", "gather_kn")}
    assert len(got) == 4 and min(got.values()) >= 100, got


def test_split_tile_round_trips_and_unsplit_names_are_unchanged():
    """A manifest's spec dict gives the split spec back (the loader's ``spec_from_dict``);
    ``split_k = 1`` stays out of the dict, so unsplit kernels keep their names; the generators
    without split-K refuse it."""
    from rnn_sparsify.codegen.errors import UnsupportedGemm
    from rnn_sparsify.codegen.gemm_gather import WgradT, spec_from_dict

    for _, g in SPECS["650/B20"].gemms():
        d = g.to_dict()
        assert spec_from_dict(d) == g and spec_from_dict(d).out_shape == g.out_shape
        assert ("split_k" in d["tile"]) == (g.tile.split_k > 1)
    assert GatherK(T=1, M=20, N=2600, K=650, k=325).name == "gather_k_a0adaff9d0ea"  # as before split-K
    with pytest.raises(UnsupportedGemm):
        WgradT(T=2, B=8, kc=16, K=32, k=8, tile=Tile(split_k=2))
    with pytest.raises(UnsupportedGemm):
        Tile(split_k=0)
