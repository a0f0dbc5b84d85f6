"""The largest hidden size whose weight-sparse LSTM layer fits on chip for the sparse persistent
eval kernel (``codegen/persistent_sparse.py``), per arch and density: the table of
``docs/persistent_kernels.md``. No GPU: shared memory from the spec (equal to TVM's
allocation, checked at build), registers from ptxas (``--exact``, nvcc) or the estimate.

    python benchmarks/persistent_capacity.py [--exact] [--dtype bfloat16] [--batch 4]

A layer fits when one CTA per SM of the reference part (A100: 108 SMs, 164 KB; H100: 132 SMs,
228 KB) holds its units' gate rows: non-zeros padded to the row bound ``nnz_bound(H, d)``
(random masks: mean + 5 sigma), up to 24 per thread in registers, the rest and h_{t-1} in
shared memory, and the grid is co-resident (registers, shared memory, threads).
"""
from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
import tempfile
from pathlib import Path



@functools.lru_cache(maxsize=None)
def ptxas_registers(spec, arch: str) -> int:
    from rnn_sparsify.codegen.persistent_sparse import cuda_source
    from rnn_sparsify.codegen.toolchain import nvcc_path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.cu").write_text(cuda_source(spec, arch))
        r = subprocess.run([nvcc_path(), "--cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-o", f"{d}/k.cubin",
                            f"{d}/k.cu"], capture_output=True, text=True)
    m = re.search(r"Used (\d+) registers", r.stderr)
    if m is None:
        raise RuntimeError(r.stderr[-2000:])
    return int(m.group(1))


def main(argv=None) -> int:
    from rnn_sparsify.codegen.persistent_sparse import ARCH_LIMITS, fits, max_hidden_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exact", action="store_true", help="registers from ptxas (needs TVM + nvcc), else estimated")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--densities", default="0.1,0.2,0.3,0.5")
    a = ap.parse_args(argv)
    print(f"| arch | density | largest hidden size | CTAs x threads | non-zeros/row (bound) | in registers/thread "
          f"| shared memory/CTA | registers/thread ({'ptxas' if a.exact else 'estimate'}) |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in ARCH_LIMITS:
        for d in (float(x) for x in a.densities.split(",")):
            regs = (lambda s, arch=arch: ptxas_registers(s, arch)) if a.exact else None
            H = max_hidden_size(d, arch, dtype=a.dtype, batch=a.batch, registers_of=regs)
            s = fits(H, d, arch, dtype=a.dtype, batch=a.batch, registers_of=regs)
            r = ptxas_registers(s, arch) if a.exact else "~" + str(__import__(
                "rnn_sparsify.codegen.persistent_sparse", fromlist=["x"]).estimated_registers(s))
            print(f"| {arch} | {d:.0%} | {H} | {s.grid} x {s.threads} | {s.nnz} | {s.reg_nnz} | "
                  f"{s.smem_bytes() / 1024:.1f} KB | {r} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
