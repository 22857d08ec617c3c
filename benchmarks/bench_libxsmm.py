"""The CPU micro-kernels against LIBXSMM's JIT-generated kernels for the same products.

LIBXSMM (Debian's `libxsmm-dev`, version 1.17) generates small-matrix kernels at run time and
is the usual way to get fast small GEMMs on x86.  This compares, on one thread and on the same
operands, the op's kernels with LIBXSMM's for:
    forward  y = x . W over one row group of the op's feature_axis=1 forward (96 rows, its
             column ranges); LIBXSMM: a batch-reduce GEMM per output block column
    grad_w   dw = x^T . dy at every stored block over 1024 rows; LIBXSMM: a GEMM per block
with C = K = 4096 and random layouts, and prints the time of each, the ratio and whether the
two results agree bit for bit.  The full grid writes its table to docs/benchmarks.md.

    python benchmarks/bench_libxsmm.py            # the grid (about a minute on 2 cores)
    python benchmarks/bench_libxsmm.py --quick    # bs 16 and 32 at 10% density, printed only

Needs g++ and LIBXSMM's headers and static library (`apt-get install libxsmm-dev`); the
project itself does not link LIBXSMM.
"""

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.report import command_line, machine_description, write_section  # noqa: E402
from examples.cli import fraction, positive_int  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBXSMM_HEADER = "/usr/include/libxsmm.h"
SECTION = "CPU: micro-kernels against LIBXSMM"
# Relative difference allowed between the two results (both sum in float32; in practice they
# agree bit for bit, which the table reports).
TOLERANCE = 1e-5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # The block sizes the comparison program takes (LIBXSMM has no kernels of bs 1 here).
    p.add_argument("--block-sizes", type=int, nargs="+", default=[8, 16, 32, 64],
                   choices=(8, 16, 32, 64))
    p.add_argument("--densities", type=fraction, nargs="+", default=[0.02, 0.10, 0.50])
    p.add_argument("--forward-rows", type=positive_int, default=96,
                   help="rows of the forward (the op's row group at C = 4096: 96)")
    p.add_argument("--grad-rows", type=positive_int, default=1024, help="rows of the weight gradient")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed runs; the fastest counts")
    p.add_argument("--quick", action="store_true",
                   help="bs 16 and 32 at 10%% (overriding --block-sizes and --densities); no files")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where benchmarks.md goes")
    args = p.parse_args(argv)
    if args.quick:
        args.block_sizes, args.densities = [16, 32], [0.10]
    return args


def instruction_set():
    """The kernel namespace this processor runs (as ops/blocksparse_matmul_cpu.cc picks it) and
    its compiler flags, or None without AVX2."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    if "avx512f" in flags and "avx512vl" in flags:
        return "avx512", ["-mavx512f", "-mavx512vl", "-mfma"]
    if "avx2" in flags and "fma" in flags:
        return "avx2", ["-mavx2", "-mfma"]
    return None


def libxsmm_available():
    """Whether the comparison can run here: LIBXSMM's headers, g++, and AVX2 or AVX-512."""
    return (os.path.exists(LIBXSMM_HEADER) and shutil.which("g++") is not None
            and instruction_set() is not None)


def build(workdir):
    """Compiles the comparison program with the op's kernels of this processor's instruction set."""
    isa, isa_flags = instruction_set()
    kernels = os.path.join(workdir, "kernels.o")
    # The kernels with the flags ops/BUILD gives them.
    subprocess.run(["g++", "-O3", "-ffp-contract=fast", f"-DBSMM_ISA={isa}", *isa_flags,
                    "-I", ROOT, "-c", os.path.join(ROOT, "ops", "blocksparse_matmul_cpu_isa.cc"),
                    "-o", kernels], check=True)
    program = os.path.join(workdir, "libxsmm_compare")
    subprocess.run(["g++", "-O2", "-std=c++17", f"-DCOMPARE_ISA={isa}", "-I", ROOT,
                    os.path.join(ROOT, "benchmarks", "libxsmm_compare.cc"),
                    os.path.join(ROOT, "ops", "block_layout.cc"), kernels, "-o", program,
                    "-lxsmm", "-lxsmmnoblas", "-lpthread", "-ldl", "-lm", "-lrt"], check=True)
    return program, isa


def run_case(program, product, bs, density, rows, repeats):
    out = subprocess.run([program, product, str(bs), str(density), str(rows), str(repeats)],
                         check=True, capture_output=True, text=True).stdout.split()
    ours, theirs, flops, max_diff, max_value = map(float, out)
    if max_diff > TOLERANCE * max_value:
        raise AssertionError(f"{product} bs {bs} density {density}: the op's kernel and "
                             f"LIBXSMM's differ by {max_diff:g} (largest value {max_value:g})")
    return dict(product=product, bs=bs, density=density, rows=rows, ours_ms=ours * 1e3,
                libxsmm_ms=theirs * 1e3, ours_gflops=flops / ours * 1e-9,
                libxsmm_gflops=flops / theirs * 1e-9, ratio=theirs / ours,
                bitwise=max_diff == 0)


def cases(args, row_pairs_block_size):
    for product, rows in (("forward", args.forward_rows), ("grad_w", args.grad_rows)):
        for bs in args.block_sizes:
            if product == "grad_w" and bs == row_pairs_block_size:
                continue  # its panels interleave rows, which LIBXSMM's GEMM does not read
            for density in args.densities:
                yield product, bs, density, rows


def table(rows):
    lines = ["| product | rows | bs | density | ours ms | LIBXSMM ms | LIBXSMM time / ours "
             "| ours GFLOP/s | LIBXSMM GFLOP/s | bitwise equal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['product']} | {r['rows']} | {r['bs']} | {r['density']:.2f} "
                     f"| {r['ours_ms']:.3f} | {r['libxsmm_ms']:.3f} | {r['ratio']:.2f} "
                     f"| {r['ours_gflops']:.0f} | {r['libxsmm_gflops']:.0f} "
                     f"| {'yes' if r['bitwise'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not libxsmm_available():
        print("LIBXSMM's headers (apt-get install libxsmm-dev), g++ or an AVX2 processor are "
              "missing: nothing to compare")
        return []
    with tempfile.TemporaryDirectory() as workdir:
        program, isa = build(workdir)
        # bs 8's weight gradient reads row-pair panels only under AVX-512.
        row_pairs = 8 if isa == "avx512" else 0
        rows = [run_case(program, *case, args.repeats) for case in cases(args, row_pairs)]
    text = table(rows)
    print(text)
    if not args.quick:
        command = command_line("bench_libxsmm.py", argv)
        body = (f"- Machine: {machine_description()}\n"
                f"- Date: {datetime.date.today().isoformat()}\n"
                f"- Command: `{command}`\n"
                f"- One thread, C = K = 4096, random layouts, {isa} kernels, LIBXSMM 1.17 "
                f"(Debian); fastest of {args.repeats} runs. `LIBXSMM time / ours` above 1: "
                "ours is faster.\n\n" + text)
        write_section(os.path.join(args.out, "benchmarks.md"), SECTION, body)
    return rows


if __name__ == "__main__":
    main()
