#!/usr/bin/env bash
# GPU check of the TVM-generated kernels, in two steps.
#
#   scripts/gpu_check.sh prepare        # on a machine WITH TVM + nvcc (no GPU needed):
#       builds the test + benchmark kernel bundle  -> bundles/gpu_check/
#       and the wheels the GPU machine needs       -> .whl/ (rnn_sparsify, cuda-bindings, cuda-pathfinder)
#   scripts/gpu_check.sh run OUT_DIR    # on the GPU machine (no TVM, no network needed):
#       installs the carried wheels, runs the gpu-marked tests and the benchmark,
#       writes pytest.log, bench.md, env.txt and status into OUT_DIR.
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
m = compile_lstms(tests + bench_lstm_specs(), archs, out)
print(f"{out}: {len(m.kernels)} kernels for {archs}")
PYEOF
    mkdir -p .whl
    rm -f .whl/*.whl
    $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl .
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "cuda-bindings>=13,<14" cuda-pathfinder
    ls -la .whl "$BUNDLE" | head -40
    du -sh .whl "$BUNDLE"
}

run() {
    OUT=${1:?usage: scripts/gpu_check.sh run OUT_DIR}
    mkdir -p "$OUT"
    [ -f "$BUNDLE/manifest.json" ] || { echo "no $BUNDLE: run 'scripts/gpu_check.sh prepare' first and carry it" | tee "$OUT/status"; exit 2; }
    {
        nvidia-smi || true
        $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    } > "$OUT/env.txt" 2>&1
    $PY -m pip install -q --no-index --no-deps .whl/*.whl >> "$OUT/env.txt" 2>&1
    $PY -c "import tvm" 2>/dev/null && echo "note: TVM is installed here; the run does not use it" >> "$OUT/env.txt"
    export RNN_SPARSIFY_TEST_BUNDLE=$PWD/$BUNDLE
    set +e
    $PY -m pytest -q -rs -m gpu tests/kernels/test_cuda_gpu.py -p no:cacheprovider > "$OUT/pytest.log" 2>&1
    rc_tests=$?
    $PY -m rnn_sparsify.codegen.cli bench --bundle "$BUNDLE" --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
    rc_bench=$?
    set -e
    echo "tests rc=$rc_tests bench rc=$rc_bench" | tee "$OUT/status"
    tail -5 "$OUT/pytest.log"
    [ $rc_tests -eq 0 ] && [ $rc_bench -eq 0 ]
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare | run OUT_DIR" >&2; exit 2 ;;
esac
