"""Static launch facts (``codegen/launch_report.py``): CTAs and K stages of every GEMM of the
README's models, from the specs' tiles; pure arithmetic, no TVM."""
import math

import pytest

from rnn_sparsify.codegen import launch_report as lr
from rnn_sparsify.codegen.schedule import launch_dims, tensorcore

SPECS = lr.readme_specs()


@pytest.mark.parametrize("name", list(SPECS))
def test_ctas_match_the_schedule_grid(name):
    """``spec.ctas`` is the grid the tensor-core schedule's launch uses; ``k_stages`` the
    padded reduction over ``bk``."""
    for method, g in SPECS[name].gemms():
        grid, _ = launch_dims(g, tensorcore)
        assert g.ctas == math.prod(grid), (method, g)
        M, N, K = g.mnk
        assert g.k_stages == max(1, math.ceil(K / g.tile.bk)), (method, g)


def test_report_lists_every_gemm():
    text = lr.report()
    assert text.count("\n") == sum(len(s.gemms()) for s in SPECS.values())
    assert "fwd_recurrent" in text and "bwd_data" in text
