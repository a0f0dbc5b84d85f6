"""The layer-backend rule of the persistent training loops: which bundle entries run a layer
call (shape, dtype, dropout, coarse selection) and the reason when none does; selected by
``select_layer_backend`` for a CUDA call (kernels faked by the CPU twins: no GPU here)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rnn_sparsify.kernels import persistent_train as pt
from rnn_sparsify.kernels.layer import LayerProblem, select_layer_backend

CUDA = torch.device("cuda", 0)


def _entry(part, H, B, keep, dtype="bfloat16", coarse=(), grid=4, key=None):
    from rnn_sparsify.codegen.persistent_train import PersistentTrainSpec

    spec = PersistentTrainSpec.make(part, H, B, keep, dtype, grid, coarse=coarse if part == "bwd" else ())
    return SimpleNamespace(spec=spec.to_dict(), key=key or f"{part}-{H}-{B}-{keep}-{dtype}-{coarse}",
                           symbol=f"{spec.name}_kernel")


def _problem(**kw):
    base = dict(device=CUDA, dtype=torch.bfloat16, input_size=8, hidden_size=40, batch=4, seq_len=5, rec_keep=20)
    return LayerProblem(**{**base, **kw})


ENTRIES = [_entry("fwd", 40, 4, 20), _entry("bwd", 40, 4, 20), _entry("bwd", 40, 4, 20, coarse=(4, 8, 4)),
           _entry("fwd", 40, 8, 30), _entry("bwd", 40, 8, 30), _entry("fwd", 40, 4, 20, dtype="float32"),
           _entry("bwd", 40, 4, 20, dtype="float32", coarse=(4, 8, 4))]


def test_match_takes_the_smallest_kernels_that_hold_the_call():
    fe, be = pt.match_entries(ENTRIES, _problem())
    assert (fe.spec["batch"], fe.spec["keep"], be.spec["coarse"]) == (4, 20, [])
    fe, be = pt.match_entries(ENTRIES, _problem(batch=3, rec_keep=12))  # padded into the small kernels
    assert (fe.spec["batch"], be.spec["keep"]) == (4, 20)
    fe, be = pt.match_entries(ENTRIES, _problem(batch=6, rec_keep=25))  # only the larger ones hold it
    assert (fe.spec["batch"], be.spec["keep"]) == (8, 30)
    fe, be = pt.match_entries(ENTRIES, _problem(gate_mode="coarse", gate_coarse=(4, 8, 4)))
    assert be.spec["coarse"] == [4, 8, 4] and fe.spec["part"] == "fwd"
    fe, be = pt.match_entries(ENTRIES, _problem(dtype=torch.float32, gate_mode="coarse", gate_coarse=(4, 8, 4)))
    assert fe.spec["dtype"] == be.spec["dtype"] == "float32"


@pytest.mark.parametrize("kw,why", [
    (dict(packed=True), "packed sequences and projections"),
    (dict(proj_size=10), "packed sequences and projections"),
    (dict(gate_mode="fine"), "fine gate-gradient selection is not fused"),
    (dict(gate_mode="coarse", gate_coarse=(2, 4, 1)), "coarse (2, 4, 1)"),
    (dict(dtype=torch.float16), "float16"),
    (dict(hidden_size=48), "hidden 48"),
    (dict(batch=9), "batch"),
    (dict(rec_keep=None), "40 kept units"),  # no RH dropout needs keep == H kernels
    (dict(dtype=torch.float32), "coarse none"),  # float32 only with coarse in this bundle
])
def test_no_match_says_why(kw, why):
    res = pt.match_entries(ENTRIES, _problem(**kw))
    assert isinstance(res, str) and why in res, res


def test_rule_on_cpu_or_without_a_bundle_does_not_apply(monkeypatch):
    assert pt.persistent_train_rule(_problem(device=torch.device("cpu"))) == "not a CUDA device"
    monkeypatch.setattr(pt, "_bundle_path", lambda: None)
    assert "no kernel bundle" in pt.persistent_train_rule(_problem())
    assert "no kernel bundle" in pt.persistent_train_rule.dry(_problem())


@pytest.mark.tvm
def test_selected_for_a_matching_cuda_call_and_skipped_when_not_co_resident(tvm, monkeypatch):
    from rnn_sparsify.codegen import manifest
    from rnn_sparsify.codegen.persistent_train import PersistentTrainSpec, build_twin

    monkeypatch.setattr(pt, "_bundle_path", lambda: "/fake/bundle")
    loads = []
    monkeypatch.setattr(manifest.Manifest, "load",
                        classmethod(lambda cls, p: loads.append(p) or SimpleNamespace(kernels=ENTRIES)))
    why: dict = {}

    class FakeKernels:  # TrainKernels with the CPU twins as launchers
        def __init__(self, path, device):
            self.why = why

        def launcher(self, e):
            s = PersistentTrainSpec.from_dict(e.spec)
            return pt.twin_launcher(build_twin(s)[s.name + "_twin"], s)

    monkeypatch.setattr(pt, "TrainKernels", FakeKernels)
    monkeypatch.setattr(pt, "_TRAIN_KERNELS", {})
    monkeypatch.setattr(pt, "_MANIFESTS", {})
    problem = _problem(gate_mode="coarse", gate_coarse=(4, 8, 4))
    backend, verdicts = select_layer_backend(problem)
    assert isinstance(backend, pt.PersistentTrainLayerBackend)
    assert verdicts == [("tvm_cpu", "cuda tensors (CPU kernels)"), ("persistent_train", "used")]
    assert backend.bs.coarse == (4, 8, 4) and backend.fs.batch == 4
    dry, verdicts = select_layer_backend(problem, dry=True)
    assert dry.name == "persistent_train" and verdicts[-1][1].startswith("used: ")
    why[ENTRIES[2].key] = "grid of 4 CTAs not co-resident (test)"
    backend, verdicts = select_layer_backend(problem)
    assert not isinstance(backend, pt.PersistentTrainLayerBackend)
    assert ("persistent_train", "grid of 4 CTAs not co-resident (test)") in verdicts
    # a bundle built with two --sms: the larger grid unless this GPU cannot hold it
    big = [_entry("fwd", 40, 4, 20, grid=6, key="fwd6"), _entry("bwd", 40, 4, 20, coarse=(4, 8, 4), grid=6, key="bwd6")]
    monkeypatch.setattr(pt, "_MANIFESTS", {"/fake/bundle": ENTRIES + big})
    why.clear()
    backend, _ = select_layer_backend(problem)
    assert backend.fs.grid == backend.bs.grid == 6
    why["bwd6"] = "grid of 6 CTAs not co-resident (test)"
    backend, _ = select_layer_backend(problem)
    assert isinstance(backend, pt.PersistentTrainLayerBackend) and backend.bs.grid == 4
    assert loads == ["/fake/bundle"]  # the manifest is read once, not on every layer call
