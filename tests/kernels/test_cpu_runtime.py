"""Loading the TVM CPU kernels: the kernel cache, fallbacks, a TVM-free process, threads, ISA.

The cache tests point ``RNN_SPARSIFY_CACHE`` at a temporary folder and swap the process-level
caches (``cpu_runtime._LOADED``, ``cpu_backend._FAILED`` / ``_WARNED``, the bundle list) for
empty ones, so nothing leaks into other tests. They share one small spec (8 inputs, 16 hidden,
batch 2, dropout 0.5/0.5), built once per module into a temporary cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from rnn_sparsify import SparseLSTM, StructuredDropout
from rnn_sparsify.codegen.cpu_lstm import ISA_TILES, pad_batch, pad_kept
from rnn_sparsify.kernels import REFERENCE, cpu_backend, cpu_runtime
from rnn_sparsify.kernels.cpu_backend import TvmCpuLayerBackend
from rnn_sparsify.kernels.layer import ComposedLayerBackend, LayerProblem, select_layer_backend

from ._cpu_common import one_thread  # noqa: F401 - fixture
from ._cpu_common import (
    assert_close_to_ref,
    cpu_backend_for,
    draw_masks,
    make_inputs,
    need_cpu_kernels,
    rel_err,
    run_layer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

I, H, B, T = 8, 16, 2, 4
SD = StructuredDropout(0.5, 0.5)
ORACLE = ComposedLayerBackend(REFERENCE)


def small_spec():
    # what SparseLSTM(8, 16, structured_dropout=SD) asks for at batch 2: 4 of 8 inputs and
    # 8 of 16 hidden units kept per step
    return TvmCpuLayerBackend(cpu_runtime.host_isa()).spec_for(I, H, B, 4, 8)


def isolate(monkeypatch, cache: Path):
    """Point the kernel cache at ``cache`` and start from empty process-level caches."""
    monkeypatch.setenv("RNN_SPARSIFY_CACHE", str(cache))
    monkeypatch.delenv("RNN_SPARSIFY_KERNELS", raising=False)
    monkeypatch.delenv("RNN_SPARSIFY_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu_runtime, "_LOADED", {})
    monkeypatch.setattr(cpu_runtime, "_BUNDLES", [])
    monkeypatch.setattr(cpu_runtime, "_ENV_CHECKED", True)
    monkeypatch.setattr(cpu_backend, "_FAILED", {})
    monkeypatch.setattr(cpu_backend, "_WARNED", set())


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def train_step(seed=0):
    """One SparseLSTM training step on the small shape; returns the module."""
    torch.manual_seed(seed)
    m = SparseLSTM(I, H, structured_dropout=SD).train()
    out, (h, c) = m(torch.randn(T, B, I))
    (out.sum() + h.sum() + c.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    return m


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A temporary cache holding the small spec's library (built here, once per module)."""
    need_cpu_kernels()
    root = tmp_path_factory.mktemp("kcache")
    mp = pytest.MonkeyPatch()
    try:
        isolate(mp, root)
        calls = []
        real = cpu_runtime.build_entry
        mp.setattr(cpu_runtime, "build_entry", lambda *a, **k: calls.append(a) or real(*a, **k))
        lib = cpu_runtime.load_layer(small_spec())
        assert len(calls) == 1, "a miss builds exactly once"
        assert lib.path == cpu_runtime.entry_dir(root, small_spec()) / "layer.so"
    finally:
        mp.undo()
    return root


# --------------------------------------------------------------------------------------
# the cache


def test_miss_builds_entry_with_manifest(built_cache):
    spec = small_spec()
    folder = cpu_runtime.entry_dir(built_cache, spec)
    key = cpu_runtime.spec_key(spec)
    assert folder == built_cache / "cpu" / key[:2] / key
    man = json.loads((folder / "manifest.json").read_text())
    assert man["sha256"] == sha256(folder / "layer.so")
    assert man["spec"] == spec.to_dict()
    assert man["spec"]["isa"] == cpu_runtime.host_isa()
    # no temporary build folders left behind
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".build-")] == []


def test_second_load_is_a_hit(built_cache, monkeypatch):
    isolate(monkeypatch, built_cache)  # empty _LOADED: a new process, as far as loading goes
    spec = small_spec()
    so = cpu_runtime.entry_dir(built_cache, spec) / "layer.so"
    before = (so.stat().st_mtime_ns, sha256(so))

    def no_build(*a, **k):
        raise AssertionError("a cache hit must not build")

    monkeypatch.setattr(cpu_runtime, "build_entry", no_build)
    lib = cpu_runtime.load_layer(spec)
    assert lib.path == so
    assert cpu_runtime.load_layer(spec) is lib  # then per process
    assert (so.stat().st_mtime_ns, sha256(so)) == before
    # and it computes: a training step on the cached kernels
    m = train_step()
    assert m.last_backend == "tvm_cpu"
    # the dry rule (reports) names the cache without loading anything
    prob = LayerProblem(device=torch.device("cpu"), dtype=torch.float32, input_size=I,
                        hidden_size=H, batch=B, seq_len=T, in_keep=4, rec_keep=8)
    be, verdicts = select_layer_backend(prob, dry=True)
    assert be.name == "tvm_cpu"
    assert verdicts == [("tvm_cpu", f"used: {cpu_runtime.host_isa()} kernels in {built_cache}")]


def test_corrupted_library_is_rebuilt(built_cache, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    shutil.copytree(built_cache, root)
    isolate(monkeypatch, root)
    spec = small_spec()
    folder = cpu_runtime.entry_dir(root, spec)
    so = folder / "layer.so"
    good = sha256(so)
    data = bytearray(so.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # never loaded from this path
    so.write_bytes(bytes(data))
    assert sha256(so) != json.loads((folder / "manifest.json").read_text())["sha256"]

    # without TVM a corrupt entry is refused, not loaded
    monkeypatch.setattr(cpu_runtime, "tvm_available", lambda: False)
    with pytest.raises(cpu_runtime.KernelUnavailable, match="apache-tvm is not installed"):
        cpu_runtime.find_or_build(spec)
    monkeypatch.undo()
    isolate(monkeypatch, root)

    calls = []
    real = cpu_runtime.build_entry
    monkeypatch.setattr(cpu_runtime, "build_entry", lambda *a, **k: calls.append(a) or real(*a, **k))
    lib = cpu_runtime.load_layer(spec)
    assert len(calls) == 1, "a sha mismatch rebuilds"
    man = json.loads((folder / "manifest.json").read_text())
    assert man["sha256"] == sha256(so)
    assert lib.path == so
    # the rebuilt library is the same code (deterministic build) or at least valid
    assert cpu_runtime._valid_entry(folder)
    del good


def _unwritable_cache(tmp_path, how):
    if how == "under_a_file":
        f = tmp_path / "file"
        f.write_text("not a folder")
        return f / "x"
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        (d / "probe").write_text("")
    except OSError:
        return d
    (d / "probe").unlink()
    d.chmod(0o700)
    pytest.skip("chmod 0o500 does not block writes here (running as root)")


@pytest.mark.parametrize("how", ["under_a_file", "chmod"])
def test_unwritable_cache_is_kernel_unavailable(tmp_path, monkeypatch, how):
    need_cpu_kernels()
    root = _unwritable_cache(tmp_path, how)
    isolate(monkeypatch, root)
    with pytest.raises(cpu_runtime.KernelUnavailable) as ei:
        cpu_runtime.load_layer(small_spec())
    msg = str(ei.value)
    assert str(root) in msg and "not writable" in msg and "RNN_SPARSIFY_CACHE" in msg


def test_unwritable_cache_falls_back_with_one_warning(tmp_path, monkeypatch):
    need_cpu_kernels()
    root = _unwritable_cache(tmp_path, "under_a_file")
    isolate(monkeypatch, root)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        m1 = train_step(seed=1)
        m2 = train_step(seed=2)  # the failure is remembered: no second warning, no retry
    runtime_warnings = [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(runtime_warnings) == 1, [str(w.message) for w in rec]
    msg = str(runtime_warnings[0].message)
    assert "not writable" in msg and "reference" in msg
    for m in (m1, m2):
        assert m.last_backend == "reference"
        (rule, why), gpu, last = m.last_backend_reasons
        assert rule == "tvm_cpu" and why.startswith("CPU kernels unavailable:") and "not writable" in why
        assert gpu == ("persistent_train", "not a CUDA device")
        assert last == ("per-step GEMMs (reference)", "used")


def test_without_tvm_falls_back_with_one_warning(tmp_path, monkeypatch):
    pytest.importorskip("tvm_ffi")
    isolate(monkeypatch, tmp_path / "empty")
    monkeypatch.setattr(cpu_runtime, "tvm_available", lambda: False)
    prob = LayerProblem(device=torch.device("cpu"), dtype=torch.float32, input_size=I,
                        hidden_size=H, batch=B, seq_len=T, in_keep=4, rec_keep=8)
    _, verdicts = select_layer_backend(prob, dry=True)
    assert verdicts[0][0] == "tvm_cpu" and "apache-tvm is not installed" in verdicts[0][1]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        reason = cpu_backend.cpu_rule(prob)
        assert isinstance(reason, str) and "apache-tvm is not installed" in reason
        m = train_step(seed=3)
        train_step(seed=4)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert m.last_backend == "reference"
    assert m.last_backend_reasons[0] == ("tvm_cpu", reason)
    assert not (tmp_path / "empty" / "cpu").exists() or not any(
        (tmp_path / "empty" / "cpu").rglob("layer.so"))


# --------------------------------------------------------------------------------------
# a process without TVM: cached kernels load with tvm_ffi alone


@pytest.mark.parametrize("pool", ["torch_openmp", "own"])
def test_kernels_run_in_a_process_without_tvm(built_cache, tmp_path, pool):
    root = tmp_path / "cache"
    shutil.copytree(built_cache, root)
    # the C runtime too, so that the child builds nothing at all
    rt_dst = cpu_runtime._runtime_path(root)
    rt_src = [cpu_runtime._runtime_path(r) for r in (built_cache, cpu_runtime.cache_dir())]
    rt_src = [p for p in rt_src if p.exists()]
    if rt_src:
        shutil.copy2(rt_src[0], rt_dst)
    else:
        cpu_runtime.build_runtime(rt_dst)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    code = textwrap.dedent(f"""
        import sys, importlib.abc

        class NoTVM(importlib.abc.MetaPathFinder):  # `tvm` cannot be imported (tvm_ffi can)
            def find_spec(self, name, path=None, target=None):
                if name == "tvm" or name.startswith("tvm."):
                    raise ImportError("tvm is blocked in this test")
                return None

        sys.meta_path.insert(0, NoTVM())
        import torch
        import rnn_sparsify
        from rnn_sparsify import SparseLSTM, StructuredDropout
        torch.set_num_threads(2)  # parallel launches: torch's OpenMP pool or the runtime's own
        torch.manual_seed(0)
        m = SparseLSTM({I}, {H}, structured_dropout=StructuredDropout(0.5, 0.5)).train()
        out, (h, c) = m(torch.randn({T}, {B}, {I}))
        (out.sum() + h.sum()).backward()
        assert m.last_backend == "tvm_cpu", m.last_backend_reasons
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        assert "tvm" not in sys.modules, sorted(k for k in sys.modules if k.startswith("tvm"))
        assert "tvm_ffi" in sys.modules
        print("CHILD-OK")
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RNN_SPARSIFY_KERNELS", "RNN_SPARSIFY_CPU_ISA", "RNN_SPARSIFY_CPU_KERNELS")}
    env["RNN_SPARSIFY_CACHE"] = str(root)
    if pool == "own":
        env["RNN_SPARSIFY_CPU_POOL"] = "own"
    else:
        env.pop("RNN_SPARSIFY_CPU_POOL", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CHILD-OK" in res.stdout
    assert "compiling" not in res.stderr, res.stderr
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert after == before, "the child wrote to the cache"


# --------------------------------------------------------------------------------------
# threads


def test_thread_count_does_not_change_results():
    need_cpu_kernels()
    Bt, It, Ht = 20, 40, 32  # a shape test_cpu_backend also uses: several parallel tasks
    inp = make_inputs(5, Bt, It, Ht, seed=71)
    masks = draw_masks(5, It, Ht, 0.0, 0.3, seed=72)
    be = cpu_backend_for(It, Ht, Bt, masks, 5)
    saved = torch.get_num_threads()
    try:
        res = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            res[n], _ = run_layer(be, torch.float32, inp, masks)
            assert cpu_runtime.runtime().rnnsp_get_num_threads() == n
    finally:
        torch.set_num_threads(saved)
    for k, v in res[1].items():
        # the same float32 sums, possibly split differently among threads: 1e-6 of max|.|
        assert rel_err(res[2][k], v) <= 1e-6, k


# --------------------------------------------------------------------------------------
# ISA classes


def test_host_isa(monkeypatch):
    monkeypatch.delenv("RNN_SPARSIFY_CPU_ISA", raising=False)
    isa = cpu_runtime.host_isa()
    assert isa in ("avx512", "avx2", "generic")
    assert isa == cpu_runtime.detect_isa()
    for forced in ("avx2", "generic", "avx512"):
        monkeypatch.setenv("RNN_SPARSIFY_CPU_ISA", forced)
        assert cpu_runtime.host_isa() == forced
    monkeypatch.setenv("RNN_SPARSIFY_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="RNN_SPARSIFY_CPU_ISA"):
        cpu_runtime.host_isa()
    monkeypatch.delenv("RNN_SPARSIFY_CPU_ISA")
    assert cpu_runtime.host_isa() == isa  # the override is not cached


def test_padding_helpers():
    for isa, t in ISA_TILES.items():
        for b in (1, 3, 7, 20):
            rt, bp = pad_batch(b, isa)
            assert rt == min(t.RT, b) and bp % rt == 0 and b <= bp < b + rt
        for k in (1, 12, 35):
            kp = pad_kept(k, isa)
            assert kp >= k and kp % t.KT == 0 and kp % t.KR == 0 and kp - k < t.KT * t.KR


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_isa_kernels_match_reference(isa, monkeypatch):
    need_cpu_kernels()
    if isa == "avx2" and cpu_runtime.detect_isa() == "generic":
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setenv("RNN_SPARSIFY_CPU_ISA", isa)
    Bt, It, Ht = 7, 17, 35
    inp = make_inputs(5, Bt, It, Ht, seed=81)
    masks = draw_masks(5, It, Ht, 0.3, 0.5, seed=82)
    be = cpu_backend_for(It, Ht, Bt, masks, 5)
    assert be.isa == isa
    spec = be.spec_for(It, Ht, Bt, masks[0].shape[1], masks[2].shape[1])
    assert spec.isa == isa and spec.tiles == ISA_TILES[isa]
    ref, _ = run_layer(ORACLE, torch.float64, inp, masks, reverse=True)
    got, _ = run_layer(be, torch.float32, inp, masks, reverse=True)
    assert_close_to_ref(got, ref, what=f"{isa}: ")
    assert cpu_runtime.load_layer(spec).spec.isa == isa


def test_failing_build_warns_once_and_is_not_retried(tmp_path, monkeypatch):
    need_cpu_kernels()
    from rnn_sparsify.codegen import cpu_lstm

    isolate(monkeypatch, tmp_path / "cache")
    builds = []

    def broken_build(spec, path):
        builds.append(spec)
        raise RuntimeError("LLVM ERROR: simulated compiler failure")

    monkeypatch.setattr(cpu_lstm, "build_layer_library", broken_build)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for seed in range(3):
            m = train_step(seed=seed)  # training itself must work regardless
            assert m.last_backend == "reference"
    assert not any((tmp_path / "cache").rglob("layer.so"))
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert len(builds) == 1, f"the failed build was retried {len(builds) - 1} times"


# --------------------------------------------------------------------------------------
# concurrency


def test_concurrent_calls_from_python_threads_match_serial():
    """Several Python threads running the kernels at once (shared runtime, thread pool and
    weight cache) get bit-for-bit the results of serial calls."""
    import threading

    need_cpu_kernels()
    Bt, It, Ht = 20, 40, 32
    cases = []
    for s in range(3):
        inp = make_inputs(5, Bt, It, Ht, seed=90 + s)
        masks = draw_masks(5, It, Ht, 0.0, 0.3, seed=95 + s)
        be = cpu_backend_for(It, Ht, Bt, masks, 5)
        cases.append((inp, masks, run_layer(be, torch.float32, inp, masks)[0]))
    bad, errors = [], []

    def work(i):
        try:
            inp, masks, ref = cases[i]
            for _ in range(8):
                got, _ = run_layer(be, torch.float32, inp, masks)
                bad.extend((i, k) for k in ref if ref[k] is not None and not torch.equal(got[k], ref[k]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    torch.set_num_threads(2)  # parallel launches from every thread (restored by one_thread)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not bad, (errors, bad[:5])


# --------------------------------------------------------------------------------------
# bundles (searched before the cache)


def test_bundle_is_searched_first_and_a_corrupt_one_falls_to_the_cache(built_cache, tmp_path,
                                                                        monkeypatch):
    spec = small_spec()
    bundle, cache = tmp_path / "bundle", tmp_path / "cache"
    shutil.copytree(built_cache, bundle)
    shutil.copytree(built_cache, cache)
    isolate(monkeypatch, cache)

    def no_build(*a, **k):
        raise AssertionError("must not build")

    monkeypatch.setattr(cpu_runtime, "build_entry", no_build)
    cpu_runtime.use_cpu_bundle(bundle)
    cpu_runtime.use_cpu_bundle(bundle)  # registering twice is harmless
    assert cpu_runtime._search_roots() == [bundle, cache]
    assert cpu_runtime.find_or_build(spec) == cpu_runtime.entry_dir(bundle, spec)
    so = cpu_runtime.entry_dir(bundle, spec) / "layer.so"
    so.write_bytes(so.read_bytes()[:-100] + b"\0" * 100)  # corrupt the bundle's copy
    assert cpu_runtime.find_or_build(spec) == cpu_runtime.entry_dir(cache, spec)


def test_bundle_from_environment(built_cache, tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path / "empty-cache")
    monkeypatch.setenv("RNN_SPARSIFY_KERNELS", str(built_cache))
    monkeypatch.setattr(cpu_runtime, "_ENV_CHECKED", False)
    assert cpu_runtime._search_roots()[0] == built_cache
    assert cpu_runtime.find_or_build(small_spec()) == cpu_runtime.entry_dir(built_cache, small_spec())


def test_use_cpu_bundle_without_cpu_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "_BUNDLES", [])
    with pytest.raises(FileNotFoundError, match="no cpu/ folder"):
        cpu_runtime.use_cpu_bundle(tmp_path)
    assert cpu_runtime._BUNDLES == []


def test_use_cpu_bundle_error_names_the_folder_in_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "_BUNDLES", [])
    with pytest.raises(FileNotFoundError) as ei:
        cpu_runtime.use_cpu_bundle(tmp_path)
    assert "{p}" not in str(ei.value)
    assert f"-o {tmp_path}`" in str(ei.value)
