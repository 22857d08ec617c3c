"""CPU benchmark of BlocksparseMatMul against dense tf.matmul and tf.sparse.sparse_dense_matmul.

For every (N, block size, density) it times the three products of a layer, side by side in
one run on the same masked weights:
    fprop  y  = x . W        bprop  dx = dy . W^T        updat  dW = x^T . dy (blocks only)
and prints speedups over dense (dense time / block-sparse time).  The table, the machine, the
date and the command go to docs/benchmarks.md, a plot of speedup against density beside it.

    python benchmarks/bench_matmul.py                 # the full grid (about 10 minutes on 2 cores)
    python benchmarks/bench_matmul.py --rounds 2      # twice over, the fastest of both counting
    python benchmarks/bench_matmul.py --quick         # a small grid, printed only
    python benchmarks/bench_matmul.py --dtype bfloat16 --block-sizes 16 32 64
                                          # bfloat16 against dense bfloat16 (a section of its own)
"""

import argparse
import datetime
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blocksparse_tf import BlocksparseMatMul, cpu_isa  # noqa: E402
from blocksparse_tf.matmul import (BLOCK_SIZES, blocksparse_matmul,  # noqa: E402
                                   blocksparse_matmul_grad_w)
from examples.cli import fraction, number, positive_int, refuse_nondividing  # noqa: E402
from benchmarks.report import (best_time, command_line, machine_description,  # noqa: E402
                               write_section)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=positive_int, default=4096,
                   help="C = K (default 4096); every block size must divide it")
    p.add_argument("--batches", type=positive_int, nargs="+", default=[64, 1024])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[8, 16, 32, 64], choices=BLOCK_SIZES)
    p.add_argument("--densities", type=fraction, nargs="+", default=[0.02, 0.05, 0.10, 0.25, 0.50, 1.00])
    p.add_argument("--sparse-max-density", type=number(float, lambda v: 0 <= v <= 1, "in [0, 1]"),
                   default=0.10,
                   help="time tf.sparse.sparse_dense_matmul only up to this density (it is slow; "
                        "0: never)")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed runs per measurement; the fastest counts")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="passes over the whole grid (same layouts and inputs each pass); the fastest "
                        "time of all passes counts, so one noisy stretch on a shared machine does not "
                        "decide a cell")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the products' dtype, dense tf.matmul's too (bfloat16 gets a section and "
                        "plot of its own)")
    p.add_argument("--quick", action="store_true",
                   help="N=64 only, bs 32, densities 0.1 and 1 (overriding --batches, --block-sizes "
                        "and --densities); no files")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where benchmarks.md and the plot go")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.block_sizes, args.densities = [64], [32], [0.1, 1.0]
    refuse_nondividing(p, "--block-sizes", args.block_sizes, [args.hidden],
                       f"--hidden ({args.hidden})")
    return args




SECTIONS = {"float32": "CPU: BlocksparseMatMul against dense tf.matmul",
            "bfloat16": "CPU: BlocksparseMatMul in bfloat16 against dense bfloat16 tf.matmul"}
PLOTS = {"float32": "benchmark_cpu_speedup.png", "bfloat16": "benchmark_cpu_speedup_bfloat16.png"}


def run_case(N, bs, density, hidden, repeats, sparse_max_density, rng, dtype=tf.float32):
    blocks_per_side = hidden // bs
    layout = rng.random((blocks_per_side, blocks_per_side)) < density
    if not layout.any():
        layout[0, 0] = True
    bsmm = BlocksparseMatMul(layout, block_size=bs)
    x = tf.cast(rng.standard_normal((N, hidden)).astype(np.float32), dtype)
    dy = tf.cast(rng.standard_normal((N, hidden)).astype(np.float32), dtype)
    w = tf.cast(rng.standard_normal(bsmm.w_shape).astype(np.float32), dtype)
    W = tf.cast(bsmm.to_dense(tf.cast(w, tf.float32).numpy()), dtype)
    coords = tf.constant(bsmm.coords)
    args = dict(block_size=bs, C=hidden, K=hidden, constant_layout=True)  # as bsmm(x, w) runs

    t = {}
    # Eager ops run synchronously (see benchmarks/report.py): a call's time is its whole
    # computation.
    t["fprop"] = best_time(lambda: blocksparse_matmul(x, w, coords, **args), repeats)
    # The input gradient as the op's gradient computes it: dy . W^T reading w as stored.
    t["bprop"] = best_time(
        lambda: blocksparse_matmul(dy, w, coords, **args, transpose_w=True), repeats)
    t["updat"] = best_time(lambda: blocksparse_matmul_grad_w(x, dy, coords, **args), repeats)
    t["dense_fprop"] = best_time(lambda: tf.matmul(x, W), repeats)
    t["dense_bprop"] = best_time(lambda: tf.matmul(dy, W, transpose_b=True), repeats)
    t["dense_updat"] = best_time(lambda: tf.matmul(x, dy, transpose_a=True), repeats)
    if density <= sparse_max_density and dtype == tf.float32:
        W_sparse = tf.sparse.from_dense(W)
        # (W^T x^T)^T: the sparse operand first, as tf.sparse.sparse_dense_matmul wants.
        t["sparse_fprop"] = best_time(
            lambda: tf.sparse.sparse_dense_matmul(W_sparse, x, adjoint_a=True, adjoint_b=True),
            max(1, repeats // 2))
    return bsmm, t


def write_markdown(rows, args, path, plot_name, argv=None):
    command = command_line("bench_matmul.py", argv)
    lines = [
        f"- Machine: {machine_description()}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Command: `{command}`",
        f"- C = K = {args.hidden}, {args.dtype}, random layouts; fastest of {args.repeats} runs after a warm-up"
        f"{f' in each of {args.rounds} passes over the whole grid' if args.rounds > 1 else ''} (eager "
        "calls, synchronous; no host copy of the result; garbage collector off while timing). Speedup = dense time / block-sparse time on the same masked "
        "weights (dense does the full C x K product whatever the density). `sparse` is "
        "tf.sparse.sparse_dense_matmul (element-level sparse W) forward, as speedup over dense, "
        f"timed up to {args.sparse_max_density:.0%} density. Target: >= 0.8/density for bs >= 32, "
        ">= 0.5/density for bs 8 and 16 (densities <= 50%), >= 0.67 at 100%"
        + (" (float32's, shown for comparison)." if args.dtype != "float32" else ".")
        + (f" Kernels: `{cpu_isa()}` (`blocksparse_tf.cpu_isa()`)." if args.dtype != "float32"
           else ""),
        "",
        "| N | bs | density | fprop ms | fprop x | bprop x | updat x | target x | dense fprop ms | sparse x | GFLOP/s fprop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sparse = f"{r['sparse']:.2f}" if r["sparse"] is not None else "-"
        lines.append(
            f"| {r['N']} | {r['bs']} | {r['density']:.3f} | {r['fprop_ms']:.2f} | {r['fprop']:.2f} | "
            f"{r['bprop']:.2f} | {r['updat']:.2f} | {r['target']:.2f} | {r['dense_ms']:.2f} | {sparse} | "
            f"{r['gflops']:.0f} |")
    lines += ["", f"![speedup against density]({plot_name})", ""]
    write_section(path, SECTIONS[args.dtype], "\n".join(lines))


def plot(rows, path, dtype="float32"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, N in zip(axes[0], batches):
        for bs in sorted({r["bs"] for r in rows}):
            sel = [r for r in rows if r["N"] == N and r["bs"] == bs]
            ax.plot([r["density"] for r in sel], [r["fprop"] for r in sel], "o-", label=f"bs {bs} fprop")
        d = np.logspace(np.log10(0.02), 0, 50)
        ax.plot(d, 1 / d, "k:", label="ideal 1/density")
        ax.plot(d, 0.8 / d, "k--", lw=0.8, label="target 0.8/density")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (fraction of blocks present)")
        ax.set_ylabel("speedup over dense tf.matmul")
        ax.set_title(f"CPU, {dtype}, C = K = 4096, N = {N}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    print(f"{'N':>5} {'bs':>3} {'density':>7} {'fprop ms':>9} {'fprop x':>8} {'bprop x':>8} "
          f"{'updat x':>8} {'target':>7} {'sparse x':>8}")
    cases = [(N, bs, density) for N in args.batches for bs in args.block_sizes for density in args.densities]
    fastest = {}
    for round_index in range(args.rounds):
        for case in cases:
            N, bs, density = case
            # One seed per case: every pass sees the same layout and inputs.
            rng = np.random.default_rng([N, bs, round(density * 1e6)])
            bsmm, t = run_case(N, bs, density, args.hidden, args.repeats, args.sparse_max_density, rng,
                               tf.as_dtype(args.dtype))
            best = fastest.setdefault(case, (bsmm, t))[1]
            for key, value in t.items():
                best[key] = min(best[key], value)
            if round_index + 1 == args.rounds:
                bsmm, t = fastest[case]
                d = bsmm.density
                # The goal of the nominal density (a drawn layout may hold a little more).
                target = (0.8 if bs >= 32 else 0.5) / d if density <= 0.5 else 1 / 1.5
                row = dict(N=N, bs=bs, density=d, fprop_ms=t["fprop"] * 1e3, dense_ms=t["dense_fprop"] * 1e3,
                           fprop=t["dense_fprop"] / t["fprop"], bprop=t["dense_bprop"] / t["bprop"],
                           updat=t["dense_updat"] / t["updat"], target=target,
                           sparse=t["dense_fprop"] / t["sparse_fprop"] if "sparse_fprop" in t else None,
                           gflops=bsmm.flops(N) / t["fprop"] / 1e9)
                rows.append(row)
                sparse = f"{row['sparse']:8.2f}" if row["sparse"] is not None else f"{'-':>8}"
                print(f"{N:5d} {bs:3d} {d:7.3f} {row['fprop_ms']:9.2f} {row['fprop']:8.2f} "
                      f"{row['bprop']:8.2f} {row['updat']:8.2f} {target:7.2f} {sparse}", flush=True)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        plot_name = PLOTS[args.dtype]
        plot(rows, os.path.join(args.out, plot_name), args.dtype)
        write_markdown(rows, args, os.path.join(args.out, "benchmarks.md"), plot_name, argv)
        print(f"wrote {os.path.join(args.out, 'benchmarks.md')}")
    return rows


if __name__ == "__main__":
    main()
