"""Static instruction counts of the sparse persistent eval kernel's inner loop (no GPU): the
dot product over the shared-memory non-zeros, in the unpacked format (value and column as two
16-bit arrays) and the packed-word format (one int32 per non-zero), from nvcc's SASS.

    python benchmarks/persistent_sass_loop.py [--hidden 2304] [--density 0.3] [--batch 4] [--arch sm_90]

For each format: registers and spills (ptxas), and for the innermost loop that contains the
shared-memory h gathers (found as the backward branch whose body holds them): instructions
per iteration, non-zeros per iteration (nvcc unrolls), instructions and shared-memory loads
per non-zero. Static facts of the code, not timings. Use a shape whose inner loop nvcc does not
unroll completely (the default; at small hidden sizes the loop found is the step loop).
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path


def loop_stats(sass: str) -> dict:
    """The innermost backward-branch loop with FFMA and 64/128-bit shared loads: its instruction mix."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    best = None
    for addr, text in ins:
        tgt = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if not tgt or int(tgt.group(1), 16) >= addr:
            continue
        body = [t for a, t in ins if int(tgt.group(1), 16) <= a <= addr]
        ops = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?(\S+)", t).group(1) for t in body)
        if ops["FFMA"] and (ops["LDS.64"] or ops["LDS.128"]) and (best is None or len(body) < best["instructions"]):
            best = {"instructions": len(body), "ops": ops}
    if best is None:
        raise RuntimeError("no loop with FFMA and wide shared loads in the SASS")
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2304)
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--arch", default="sm_90", choices=["sm_80", "sm_90"])
    a = ap.parse_args(argv)

    from rnn_sparsify.codegen.persistent_sparse import cuda_source, nnz_bound, spec_for_arch
    from rnn_sparsify.codegen.toolchain import nvcc_path, sass

    base = spec_for_arch(a.hidden, a.batch, nnz_bound(a.hidden, a.density), a.dtype, a.arch)
    print(f"hidden {a.hidden}, density {a.density:.0%} (row bound {base.nnz}), batch {a.batch}, {a.dtype}, {a.arch}: "
          f"{base.grid} CTAs x {base.threads} threads, {base.reg_nnz} non-zeros per thread in registers\n")
    print("| format | registers | spills | loop instructions | non-zeros per iteration | instructions per non-zero "
          "| shared loads per non-zero | top ops per iteration |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for packed in (False, True):
        spec = replace(base, packed=packed)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "k.cu").write_text(cuda_source(spec, a.arch))
            r = subprocess.run([nvcc_path(), "--cubin", "-O3", f"-arch={a.arch}", "-Xptxas", "-v", "-o",
                                f"{d}/k.cubin", f"{d}/k.cu"], capture_output=True, text=True, check=True)
            text = sass(Path(d) / "k.cubin")
        regs = re.search(r"Used (\d+) registers", r.stderr).group(1)
        spill = re.search(r"(\d+) bytes spill stores", r.stderr).group(1)
        st = loop_stats(text)
        ops = st["ops"]
        nz = ops["LDS.64"] + ops["LDS.128"]  # one h gather per non-zero
        lds = sum(v for k, v in ops.items() if k.startswith("LDS"))
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
        print(f"| {'packed word' if packed else 'value + column arrays'} | {regs} | {spill} | {st['instructions']} | "
              f"{nz} | {st['instructions'] / nz:.2f} | {lds / nz:.2f} | {top} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
