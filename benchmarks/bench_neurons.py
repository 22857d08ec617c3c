"""CPU benchmark of neuron-level layers (block size 1) against tf.sparse.sparse_dense_matmul.

A layer of n units in which every unit has `fan_in` inputs drawn at random (neuron-level
connectivity: C = K = n, one 1 x 1 block per connection) is the case block size 1 exists for;
dense weights would take n^2 floats (40 GB at 100,000 units).  The same connections as a
tf.sparse.SparseTensor are the other way to run such a layer in TensorFlow.  For each (n,
fan_in, N) it times, side by side in one run on the same weights,
    fprop  y  = x . W        bprop  dx = dy . W^T        updat  dW = x^T . dy (connections only)
with BlocksparseMatMul's op (block_size=1) and with tf.sparse: sparse_dense_matmul for fprop
(W^T x^T, left transposed: the layout tf.sparse wants) and bprop (W dy^T, likewise), and for
updat the products x[:, c] * dy[:, k] of each connection summed over the batch (what the
gradient of sparse_dense_matmul computes for its values).  Every product is checked against
tf.sparse's.  The table, the machine, the date and the command go to docs/benchmarks.md.

    python benchmarks/bench_neurons.py            # n 16384 and 100000, fan_in 4 and 32, N 1/64/256
    python benchmarks/bench_neurons.py --quick    # a small grid, printed only
"""

import argparse
import datetime
import os
import sys

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.report import (best_time, command_line, machine_description,  # noqa: E402
                               write_section)
from blocksparse_tf import BlocksparseMatMul  # noqa: E402
from blocksparse_tf.matmul import blocksparse_matmul, blocksparse_matmul_grad_w  # noqa: E402
from examples.cli import positive_int, seed  # noqa: E402

TITLE = "CPU: neuron-level layers (block size 1) against tf.sparse"
PRODUCTS = ("fprop", "bprop", "updat")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=positive_int, nargs="+", default=[16384, 100000], help="n = C = K")
    p.add_argument("--fan-in", type=positive_int, nargs="+", default=[4, 32],
                   help="inputs per unit (connections per column of W); at most the fewest --units")
    p.add_argument("--batches", type=positive_int, nargs="+", default=[1, 64, 256], help="N")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs; the fastest counts")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--quick", action="store_true",
                   help="n 2048, fan_in 4, N 1 and 16, one run each (overriding --units, --fan-in, "
                        "--batches and --repeats); no files written")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="folder of benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.units, args.fan_in, args.batches, args.repeats = [2048], [4], [1, 16], 1
    if max(args.fan_in) > min(args.units):
        p.error(f"--fan-in ({max(args.fan_in)}) must be at most --units ({min(args.units)}): "
                "each unit's inputs are distinct")
    return args


def random_connections(rng, n, fan_in):
    """(c, k) pairs: for every unit k, fan_in distinct inputs c drawn at random."""
    k = np.repeat(np.arange(n), fan_in)
    c = np.concatenate([rng.choice(n, size=fan_in, replace=False) for _ in range(n)])
    return np.stack([c, k], axis=1).astype(np.int32)


def rel_err(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def run_case(rng, n, fan_in, N, repeats):
    """Times of both implementations (seconds) and the largest relative difference."""
    bsmm = BlocksparseMatMul((random_connections(rng, n, fan_in), (n, n)), block_size=1)
    coords = tf.constant(bsmm.coords)  # sorted, as the layer passes them
    values = rng.standard_normal(bsmm.blocks).astype(np.float32)
    w = tf.constant(values.reshape(-1, 1, 1))
    W = tf.sparse.SparseTensor(tf.cast(coords, tf.int64), values, (n, n))
    x = tf.constant(rng.standard_normal((N, n)).astype(np.float32))
    dy = tf.constant(rng.standard_normal((N, n)).astype(np.float32))
    args = dict(block_size=1, C=n, K=n, constant_layout=True)  # as the layer runs
    ours = {
        "fprop": lambda: blocksparse_matmul(x, w, coords, **args),
        "bprop": lambda: blocksparse_matmul(dy, w, coords, **args, transpose_w=True),
        "updat": lambda: blocksparse_matmul_grad_w(x, dy, coords, **args),
    }
    rows, cols = coords[:, 0], coords[:, 1]
    theirs = {
        "fprop": lambda: tf.sparse.sparse_dense_matmul(W, x, adjoint_a=True, adjoint_b=True),
        "bprop": lambda: tf.sparse.sparse_dense_matmul(W, dy, adjoint_b=True),
        "updat": lambda: tf.reduce_sum(tf.gather(x, rows, axis=1) * tf.gather(dy, cols, axis=1),
                                       axis=0),
    }
    err = max(rel_err(tf.reshape(ours[p](), [-1]),
                      tf.reshape(tf.transpose(theirs[p]()) if p != "updat" else theirs[p](), [-1]))
              for p in PRODUCTS)
    times = {}
    for p in PRODUCTS:
        times[p] = best_time(ours[p], repeats)
        times["sparse_" + p] = best_time(theirs[p], repeats)
    return times, err


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    header = (f"{'n':>7} {'fan_in':>6} {'N':>5} " +
              " ".join(f"{p + ' ms':>9} {p + ' x':>8}" for p in PRODUCTS) + f" {'max err':>8}")
    print("ms: BlocksparseMatMul (block_size=1); x: tf.sparse time / ours")
    print(header)
    results = []
    for n in args.units:
        for fan_in in args.fan_in:
            for N in args.batches:
                times, err = run_case(rng, n, fan_in, N, args.repeats)
                row = dict(n=n, fan_in=fan_in, N=N, err=err, times=times)
                results.append(row)
                cells = " ".join(f"{times[p] * 1e3:9.3f} {times['sparse_' + p] / times[p]:8.2f}"
                                 for p in PRODUCTS)
                print(f"{n:7d} {fan_in:6d} {N:5d} {cells} {err:8.1e}", flush=True)
    if not args.quick:
        write_report(results, args, argv)
    return results


def write_report(results, args, argv):
    command = command_line("bench_neurons.py", argv)
    lines = [
        f"- Machine: {machine_description()}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Command: `{command}`",
        "- A layer of n units, each with `fan_in` inputs drawn at random (C = K = n, block size "
        "1: one weight per connection), float32. Ours: the op of `BlocksparseMatMul(layout, "
        "block_size=1)` (fprop; bprop with `transpose_w`; updat, the weight gradient). tf.sparse: "
        "the same connections as a `tf.SparseTensor`, `tf.sparse.sparse_dense_matmul` for fprop "
        "(W^T x^T) and bprop (W dy^T), results left transposed; for updat each connection's "
        "products x[:, c] * dy[:, k] summed over the batch. Eager calls, synchronous, fastest of "
        f"{args.repeats} runs after a warm-up. `x` = tf.sparse time / ours. max err: the largest "
        "relative difference between the two, over the three products.",
        "",
        "| n | fan_in | N | fprop ms | fprop x | bprop ms | bprop x | updat ms | updat x "
        "| max err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["times"]
        cells = " | ".join(f"{t[p] * 1e3:.3f} | {t['sparse_' + p] / t[p]:.2f}" for p in PRODUCTS)
        lines.append(f"| {r['n']} | {r['fan_in']} | {r['N']} | {cells} | {r['err']:.1e} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "benchmarks.md")
    write_section(path, TITLE, "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
