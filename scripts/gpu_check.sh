#!/usr/bin/env bash
# GPU check of the TVM-generated kernels, in two steps.
#
#   scripts/gpu_check.sh prepare        # on a machine WITH TVM + nvcc (no GPU needed):
#       builds the test + benchmark kernel bundle  -> bundles/gpu_check/
#       and the wheels the GPU machine needs       -> .whl/ (rnn_sparsify, cuda-bindings, cuda-pathfinder)
#   scripts/gpu_check.sh run OUT_DIR    # on the GPU machine (no TVM, no network needed):
#       installs the carried wheels, runs the gpu-marked tests (GEMM kernels, sparse persistent
#       eval kernels, persistent training loops) and the benchmarks, writes pytest.log, bench.md, gpu_sparse_eval.md/.json,
#       gpu_train_step.md/.json, env.txt and status into OUT_DIR. Runs from a temporary
#       folder, so the checkout's ./rnn_sparsify cannot shadow the installed wheel.
#   scripts/gpu_check.sh rehearse OUT_DIR   # CPU rehearsal of `run` (CI: tests/test_gpu_check_script.py):
#       the wheel in a fresh venv, imports + test collection from the run stage's folders, and the
#       benchmarks' CPU self-checks (gpu_train_step.py and gpu_sparse_eval.py --selfcheck).
#
# With the device tool (see /work/.library/device/README.md): run `prepare` here, then
#   run(command="scripts/gpu_check.sh run $OUT", carry=[".whl", "bundles/gpu_check"], timeout_s=600)
# GPU machines: torch 2.11 + CUDA 13, Python 3.12, sm_90 (H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=bundles/gpu_check
PY=${PYTHON:-python3}
ARCHS=${ARCHS:-"sm_80 sm_90"}

prepare() {
    PY=${PYTHON:-.venv/bin/python}
    arch_flags=""
    for a in $ARCHS; do arch_flags="$arch_flags --arch $a"; done
    rm -rf "$BUNDLE"
    # 1) small ragged LSTMs for the correctness tests (bf16 with dropout + coarse gate sparsity, fp16)
    #    and 2) the papers' configurations for the benchmark, all into one bundle
    $PY - "$BUNDLE" $ARCHS <<'PYEOF'
import sys
from rnn_sparsify.codegen.aot import compile_lstms
from rnn_sparsify.codegen.bench import bench_lstm_specs
from rnn_sparsify.codegen.lstm_spec import LSTMSpec
out, archs = sys.argv[1], sys.argv[2:]
tests = [
    LSTMSpec(input_size=40, hidden_size=24, batch=20, seq_len=5, dtype="bfloat16", name="test_bf16",
             structured_dropout={"p_input": 0.5, "p_recurrent": 0.5},
             gate_sparsity={"mode": "coarse", "P": 4, "R": 8, "S": 4}),
    LSTMSpec(input_size=64, hidden_size=32, batch=16, seq_len=4, dtype="float16", name="test_fp16",
             structured_dropout={"p_input": 0.25, "p_recurrent": 0.5}),
]
# sparse persistent eval kernels: the GPU tests' shapes (row bound = hidden size: any mask fits)
from rnn_sparsify.codegen.persistent_sparse import PersistentEvalRequest, nnz_bound
persistent = [PersistentEvalRequest(40, 4, 40, "float32"), PersistentEvalRequest(72, 8, 72, "bfloat16")]
# persistent training loops: the GPU test's shapes (test_persistent_train_gpu.py)
from rnn_sparsify.codegen.persistent_train import PersistentTrainRequest
train = [PersistentTrainRequest(40, 4, 20, "float32", (4, 8, 4)), PersistentTrainRequest(72, 8, 47, "bfloat16")]
m = compile_lstms(tests + bench_lstm_specs(), archs, out, persistent=persistent, persistent_train=train)
# ... and the benchmarks' shapes, for sm_90 only (the GPU machines are H100/H200; the eval kernel
# at H 2304 and the 1500-unit forward training loop do not fit an A100's shared memory):
# gpu_sparse_eval.py (H 2304, 30 %, batch 4, bf16) and gpu_train_step.py (bundle_requests: the
# per-GEMM kernels and the persistent training loops of 2x1500/B20/SD 0.65 and 512/B64/coarse)
if "sm_90" in archs:
    import shutil, tempfile
    from pathlib import Path
    from rnn_sparsify.codegen.manifest import Manifest
    sys.path.insert(0, "benchmarks")
    from gpu_train_step import bundle_requests
    step_lstms, step_train = bundle_requests()
    tmp = Path(tempfile.mkdtemp())
    mb = compile_lstms(step_lstms, ["sm_90"], tmp, persistent=[PersistentEvalRequest(2304, 4, nnz_bound(2304, 0.3), "bfloat16")],
                       persistent_train=step_train)
    have = {e.key for e in m.kernels}
    new = tuple(e for e in mb.kernels if e.key not in have)
    for e in new:
        for f in (e.source, e.cubin, e.ptx):
            if f:
                shutil.copy2(tmp / f, Path(out) / f)
    m = Manifest(kernels=m.kernels + new, archs=m.archs, toolchain=m.toolchain, lstms=m.lstms + mb.lstms)
    m.save(Path(out))
    shutil.rmtree(tmp, ignore_errors=True)
print(f"{out}: {len(m.kernels)} kernels for {archs}")
PYEOF
    mkdir -p .whl
    rm -f .whl/*.whl
    $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl .
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "cuda-bindings>=13,<14" cuda-pathfinder
    ls -la .whl "$BUNDLE" | head -40 || true  # head closing the pipe early is not a failure (SIGPIPE, rc 141)
    du -sh .whl "$BUNDLE"
}

run() {
    OUT=${1:?usage: scripts/gpu_check.sh run OUT_DIR}
    PY=${PYTHON:-python3}
    mkdir -p "$OUT"
    [ -f "$BUNDLE/manifest.json" ] || { echo "no $BUNDLE: run 'scripts/gpu_check.sh prepare' first and carry it" | tee "$OUT/status"; exit 2; }
    {
        nvidia-smi || true
        $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))" || true
    } > "$OUT/env.txt" 2>&1
    # WHEELS: the rehearsal installs only the project's wheel (the carried cuda-bindings wheel is
    # built for the GPU machine's Python 3.12 and may not install on the CPU machine's Python)
    $PY -m pip install -q --no-index --no-deps ${WHEELS:-.whl/*.whl} >> "$OUT/env.txt" 2>&1
    $PY -c "import tvm" 2>/dev/null && echo "note: TVM is installed here; the run does not use it" >> "$OUT/env.txt"
    export RNN_SPARSIFY_TEST_BUNDLE=$PWD/$BUNDLE
    # Run from a folder outside the checkout: from the repository root, ./rnn_sparsify (which
    # has no codegen/) would shadow the installed wheel (python -m puts the cwd on sys.path).
    OUT_ABS=$(cd "$OUT" && pwd)
    WORK=$(mktemp -d)
    cp tests/kernels/test_cuda_gpu.py tests/kernels/test_persistent_gpu.py tests/kernels/test_persistent_train_gpu.py \
        benchmarks/gpu_sparse_eval.py benchmarks/gpu_train_step.py "$WORK/"
    printf '[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n' > "$WORK/pytest.ini"
    set +e
    (cd "$WORK" && $PY -c "import rnn_sparsify, rnn_sparsify.codegen.lstm_spec, rnn_sparsify.codegen.cli, rnn_sparsify.kernels.cuda_loader; print('rnn_sparsify from', rnn_sparsify.__file__)") > "$OUT_ABS/imports.log" 2>&1
    rc_imports=$?
    (cd "$WORK" && $PY -m pytest -q -rs -m gpu ${PYTEST_ARGS:-} test_cuda_gpu.py test_persistent_gpu.py test_persistent_train_gpu.py -p no:cacheprovider) > "$OUT_ABS/pytest.log" 2>&1
    rc_tests=$?
    if [ -n "${PYTEST_ARGS:-}" ]; then
        # no benchmark runs with PYTEST_ARGS (the rehearsal, a rerun of some tests): only their
        # CPU self-checks from the same folder (imports from the wheel, set-up code at tiny sizes)
        (cd "$WORK" && $PY gpu_train_step.py --selfcheck && $PY gpu_sparse_eval.py --selfcheck) > "$OUT_ABS/bench_selfcheck.log" 2>&1
        rc_bench=$?
    else
        (cd "$WORK" && $PY -m rnn_sparsify.codegen.cli bench --bundle "$RNN_SPARSIFY_TEST_BUNDLE" --out "$OUT_ABS/bench.md") > "$OUT_ABS/bench.log" 2>&1
        rc_bench=$?
        # the sparse persistent eval kernels vs nn.LSTM (H 2304, 30 %, batch 4, bf16, T 35)
        (cd "$WORK" && $PY gpu_sparse_eval.py --bundle "$RNN_SPARSIFY_TEST_BUNDLE" --json "$OUT_ABS/gpu_sparse_eval.json") > "$OUT_ABS/gpu_sparse_eval.md" 2>&1
        rc_pbench=$?
        [ $rc_bench -eq 0 ] && rc_bench=$rc_pbench
        # the training targets vs nn.LSTM: 2x1500/B20/SD 0.65 step, 512/B64 coarse backward (bf16, T 35)
        (cd "$WORK" && $PY gpu_train_step.py --bundle "$RNN_SPARSIFY_TEST_BUNDLE" --json "$OUT_ABS/gpu_train_step.json") > "$OUT_ABS/gpu_train_step.md" 2>&1
        rc_tbench=$?
        [ $rc_bench -eq 0 ] && rc_bench=$rc_tbench
    fi
    set -e
    [ $rc_tests -eq 5 ] && [ -n "${PYTEST_ARGS:-}" ] && rc_tests=0  # collection only, all skipped
    echo "imports rc=$rc_imports tests rc=$rc_tests bench rc=$rc_bench" | tee "$OUT/status"
    cat "$OUT/imports.log"
    tail -5 "$OUT/pytest.log"
    [ $rc_imports -eq 0 ] && [ $rc_tests -eq 0 ] && [ $rc_bench -eq 0 ]
}

# CPU rehearsal of `run` (CI runs it: tests/test_gpu_check_script.py): a fresh venv with the
# carried wheel only, then the run stage's test collection from the same folders.
rehearse() {
    OUT=${1:?usage: scripts/gpu_check.sh rehearse OUT_DIR}
    PY0=${PYTHON:-.venv/bin/python}
    mkdir -p "$OUT" .whl
    rm -f .whl/rnn_sparsify-*.whl
    $PY0 -m pip wheel -q --no-deps --no-build-isolation -w .whl .
    python3 -m venv "$OUT/venv"
    "$OUT/venv/bin/pip" install -q torch==2.13.0 pytest >> "$OUT/install.log" 2>&1
    "$OUT/venv/bin/pip" install -q "cuda-bindings>=13" >> "$OUT/install.log" 2>&1
    "$OUT/venv/bin/pip" install -q --no-deps .whl/rnn_sparsify-*.whl numpy networkx tqdm >> "$OUT/install.log" 2>&1
    BUNDLE="$OUT/bundle"  # collection only: an empty manifest, never the real bundle folder
    mkdir -p "$BUNDLE" && echo '{}' > "$BUNDLE/manifest.json"
    PYTHON="$OUT/venv/bin/python" PYTEST_ARGS="--collect-only" WHEELS=".whl/rnn_sparsify-*.whl" run "$OUT/run"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    rehearse) shift; rehearse "$@" ;;
    *) echo "usage: $0 prepare | run OUT_DIR | rehearse OUT_DIR" >&2; exit 2 ;;
esac
