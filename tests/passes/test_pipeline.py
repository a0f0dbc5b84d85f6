"""The pass pipeline of sparsify (issue 10, item 6): order and facts checked, docs match code."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rnn_sparsify import StructuredDropout, sparsify
from rnn_sparsify.passes.pipeline import FACTS, Pass, PassContractError, Pipeline, SparsifyState
from rnn_sparsify.passes.sparsify_passes import SPARSIFY_PASSES, sparsify_pipeline

ROOT = Path(__file__).resolve().parents[2]


class _Ensures(Pass):
    name, requires, ensures = "fake copy", (), ("copied",)

    def run(self, s):
        s.cfg, s.work = object(), nn.Linear(1, 1)


class _Broken(Pass):  # claims "copied" and does nothing
    name, requires, ensures = "broken", (), ("copied",)

    def run(self, s):
        pass


class _NeedsTrace(Pass):
    name, requires, ensures = "needs trace", ("traced",), ("found",)

    def run(self, s):
        pass


def test_an_order_where_a_required_fact_is_never_ensured_is_refused():
    with pytest.raises(PassContractError, match="'needs trace' requires \\['traced'\\]"):
        Pipeline([_Ensures(), _NeedsTrace()])
    with pytest.raises(PassContractError, match="unknown facts"):
        Pipeline([type("X", (Pass,), {"name": "x", "ensures": ("nonsense",)})()])


def test_a_pass_that_does_not_ensure_its_fact_stops_the_run():
    state = SparsifyState(model=nn.Linear(1, 1), configs=())
    with pytest.raises(PassContractError, match="after pass 'broken'.*copied"):
        Pipeline([_Broken()]).run(state)
    Pipeline([_Ensures()]).run(state)  # the honest one passes the same check
    assert FACTS["copied"][0](state)


def test_sparsify_pipeline_order_is_consistent_and_every_fact_is_checked():
    p = sparsify_pipeline()  # the constructor checks the order
    names = [d["name"] for d in p.describe()]
    assert names[0] == "copy" and names[-1] == "report"
    for required in ("observe", "trace", "find", "capture layers", "plan", "swap modules", "attach weight sparsity",
                     "rewrite cells", "fuse dropout", "rewrite layers", "install forwards", "verify"):
        assert required in names
    ensured = {f for d in p.describe() for f in d["ensures"]}
    assert ensured == set(FACTS)


def test_docs_list_the_passes_as_the_code_defines_them():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| `(\w+)` \| ([^|]*) \| ([^|]*) \|", doc, re.M)
    assert rows, "docs/architecture.md has no pass table"
    want = [(d["name"], cls.__name__, d["requires"], d["ensures"])
            for d, cls in zip(sparsify_pipeline().describe(), SPARSIFY_PASSES)]
    got = [(n, c, re.findall(r"\w+", r), re.findall(r"\w+", e)) for n, c, r, e in rows]
    assert got == want


def test_the_api_module_keeps_only_the_api_and_the_report():
    import importlib

    api = importlib.import_module("rnn_sparsify.sparsify")  # the module (the package attribute is the function)

    funcs = {n for n, v in vars(api).items() if callable(v) and getattr(v, "__module__", "") == api.__name__}
    assert funcs == {"sparsify", "inspect_model", "_require_config", "_run"}
    assert api.SparsifyReport.__module__ == "rnn_sparsify.report"


def test_weight_sparsity_package_has_no_import_circle_with_config():
    cfg_src = (ROOT / "rnn_sparsify" / "config.py").read_text()
    assert "weight_sparsity import" not in cfg_src and "from . import weight_sparsity" not in cfg_src
    for first in ("rnn_sparsify.weight_sparsity.masks", "rnn_sparsify.weight_sparsity.schedulers",
                  "rnn_sparsify.weight_sparsity.stats", "rnn_sparsify.config"):
        code = (f"import {first}\nfrom rnn_sparsify import config_from_dict\n"
                "print(type(config_from_dict({'kind': 'weight_sparsity', 'method': 'dst', 'total_steps': 10, "
                "'target_sparsity': 0.5})).__name__)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "WeightSparsity"


def test_weight_sparsity_package_exports_every_former_name():
    import rnn_sparsify.weight_sparsity as ws

    for name in ("WeightSparsity", "GradualPruningScheduler", "DSTScheduler", "DenseAfterSparse",
                 "attach_weight_sparsity", "detach_weight_sparsity", "weight_sparsity_stats",
                 "collect_weight_sparsity_stats", "format_weight_sparsity_stats", "strip_weight_masks",
                 "check_weight_sparsity_fits", "gradual_theta", "gradual_threshold", "paper_end_ratio",
                 "dst_prune_rate", "erdos_renyi_densities", "_mask_of", "_masked_matrices", "_lstm_matrices",
                 "_Matrix", "_Blocks", "MASK_SUFFIX", "GATES", "_unwrap", "_quantile", "_MaskScheduler"):
        assert hasattr(ws, name), name
    assert ws.MASK_SUFFIX == "_mask"


def test_a_pipeline_run_leaves_the_callers_model_untouched():
    m = nn.Sequential(nn.LSTM(4, 6))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sp = sparsify(m, StructuredDropout(0.25, 0.25), example_inputs=(torch.randn(3, 2, 4),))
    assert type(m[0]) is nn.LSTM and type(sp[0]) is not nn.LSTM
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
