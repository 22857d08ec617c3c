"""CPU benchmark of BlockSparseConv2D against tf.nn.conv2d with the same (densified) kernel.

For an input x (N, H, W, C), a kh x kw kernel, SAME padding and stride 1, it times
    forward           y = conv(x, W)
    forward+backward  y, then dx and dW from an output gradient dy
for BlockSparseConv2D (random block layouts of exactly the given density, bias off) with both
implementations, the fused block-sparse convolution ops ("fused") and the im2col +
BlocksparseMatMul path ("im2col"), and for tf.nn.conv2d with the dense (kh, kw, C, K) kernel,
all inside tf.function, side by side in one run, and prints speedups (dense time / ours).  The
dense time does not depend on the layout, so it is measured once.  The table, machine, date and
command go to docs/benchmarks.md.

    python benchmarks/bench_conv.py              # 32 x 32 x 256 -> 256, 3x3, batch 32, bs 16/32
    python benchmarks/bench_conv.py --batch 8    # a smaller batch (faster)
    python benchmarks/bench_conv.py --quick      # tiny, printed only
"""

import argparse
import datetime
import os
import sys

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from blocksparse_tf.layers.conv import BlockSparseConv2D  # noqa: E402
from blocksparse_tf.matmul import BLOCK_SIZES  # noqa: E402
from examples.cli import fraction, positive_int, refuse_nondividing, seed  # noqa: E402

IMPLEMENTATIONS = ("fused", "im2col")  # rows alternate in this order
from benchmarks.report import (best_time, command_line, machine_description,  # noqa: E402
                               write_section)

TITLE = "CPU: BlockSparseConv2D against tf.nn.conv2d"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=positive_int, default=32, help="images per batch N")
    p.add_argument("--size", type=positive_int, default=32, help="image height = width")
    p.add_argument("--channels", type=positive_int, nargs=2, default=[256, 256], metavar=("C", "K"),
                   help="input and output channels; every block size must divide both")
    p.add_argument("--kernel", type=positive_int, default=3, help="kernel height = width")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32], choices=BLOCK_SIZES)
    p.add_argument("--densities", type=fraction, nargs="+", default=[0.05, 0.10, 0.25, 0.50])
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs; the fastest counts")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--quick", action="store_true",
                   help="batch 2, 8x8 images, 64 -> 64 channels, bs 16, densities 0.25 and 0.5, "
                        "one run each (overriding --batch, --size, --channels, --block-sizes, "
                        "--densities and --repeats); no files written")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="folder of benchmarks.md")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.channels, args.block_sizes = 2, 8, [64, 64], [16]
        args.densities, args.repeats = [0.25, 0.5], 1
    C, K = args.channels
    refuse_nondividing(p, "--block-sizes", args.block_sizes, [C, K],
                       f"both --channels ({C} and {K})")
    return args


def random_layout(rng, rows, cols, density):
    """A (rows, cols) 0/1 block layout with exactly round(density * rows * cols) blocks (>= 1)."""
    n = max(1, int(round(density * rows * cols)))
    layout = np.zeros(rows * cols, dtype=np.int32)
    layout[rng.choice(rows * cols, size=n, replace=False)] = 1
    return layout.reshape(rows, cols)


def forward_backward(fn, x, kernel, dy):
    """y = fn(x), then (dx, dkernel) for the output gradient dy."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.gradient(y, [x, kernel], output_gradients=dy)


def main(argv=None):
    args = parse_args(argv)
    N, S, k = args.batch, args.size, args.kernel
    C, K = args.channels
    rng = np.random.default_rng(args.seed)
    x = tf.constant(rng.standard_normal((N, S, S, C)).astype(np.float32))
    dy = tf.constant(rng.standard_normal((N, S, S, K)).astype(np.float32))
    dense_w = tf.Variable((rng.standard_normal((k, k, C, K)) / np.sqrt(k * k * C)).astype(np.float32))

    def dense_conv(inp):
        return tf.nn.conv2d(inp, dense_w, strides=1, padding="SAME")

    dense_fwd_fn = tf.function(dense_conv)
    dense_bwd_fn = tf.function(lambda inp, g: forward_backward(dense_conv, inp, dense_w, g))
    dense_fwd = best_time(lambda: dense_fwd_fn(x), args.repeats)
    dense_bwd = best_time(lambda: dense_bwd_fn(x, dy), args.repeats)
    print(f"x ({N}, {S}, {S}, {C}) -> {K} channels, {k}x{k} SAME; tf.nn.conv2d: forward "
          f"{dense_fwd * 1e3:.1f} ms, forward+backward {dense_bwd * 1e3:.1f} ms", flush=True)
    print(f"{'bs':>3} {'density':>7} {'impl':>7} {'fwd ms':>8} {'fwd x':>6} {'f+b ms':>8} "
          f"{'f+b x':>6} {'max err':>8}")
    rows = []
    for bs in args.block_sizes:
        for density in args.densities:
            layout = random_layout(rng, C // bs, K // bs, density)
            weights = None
            for implementation in IMPLEMENTATIONS:
                layer = BlockSparseConv2D(K, k, block_size=bs, layout=layout, padding="same",
                                          use_bias=False, implementation=implementation)
                layer.build((None, S, S, C))
                if weights is None:
                    weights = layer.get_weights()
                    # The same product through tf.nn.conv2d with the densified kernel: a
                    # correctness check.
                    ref = tf.nn.conv2d(x, layer.densified_kernel(), strides=1, padding="SAME")
                layer.set_weights(weights)
                fwd_fn = tf.function(layer)
                bwd_fn = tf.function(lambda inp, g, layer=layer:
                                     forward_backward(layer, inp, layer.kernel, g))
                err = float(tf.reduce_max(tf.abs(fwd_fn(x) - ref)) / tf.reduce_max(tf.abs(ref)))
                fwd = best_time(lambda: fwd_fn(x), args.repeats)
                bwd = best_time(lambda: bwd_fn(x, dy), args.repeats)
                row = dict(bs=bs, density=float(layout.mean()), impl=implementation,
                           fwd_ms=fwd * 1e3, fwd=dense_fwd / fwd, bwd_ms=bwd * 1e3,
                           bwd=dense_bwd / bwd, err=err)
                rows.append(row)
                print(f"{bs:3d} {row['density']:7.3f} {implementation:>7} {row['fwd_ms']:8.1f} "
                      f"{row['fwd']:6.2f} {row['bwd_ms']:8.1f} {row['bwd']:6.2f} {err:8.1e}",
                      flush=True)
    if not args.quick:
        command = command_line("bench_conv.py", argv)
        lines = [
            f"- Machine: {machine_description()}",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Command: `{command}`",
            f"- x ({N}, {S}, {S}, {C}), {k}x{k} kernel, {C} -> {K} channels, stride 1, SAME, float32, "
            f"no bias; random block layouts with exactly the given fraction of blocks; every side in "
            f"`tf.function`; fastest of {args.repeats} runs (synchronous calls, no host copy of "
            "the results, garbage collector off while timing). fused = `implementation=\"fused\"` "
            "(the block-sparse convolution ops, the CPU default); im2col = "
            "`implementation=\"im2col\"` (tap windows concatenated, one BlocksparseMatMul). "
            f"Forward+backward = forward, input "
            f"gradient and kernel gradient for a given output gradient. Speedup = tf.nn.conv2d time / "
            f"BlockSparseConv2D time; tf.nn.conv2d (dense kernel): forward {dense_fwd * 1e3:.1f} ms, "
            f"forward+backward {dense_bwd * 1e3:.1f} ms. Relative error: max |ours - tf.nn.conv2d "
            "with the densified kernel| / max |tf.nn.conv2d|.",
            "",
            "| bs | density | fused fwd ms | fused fwd x | im2col fwd x | fused fwd+bwd ms | "
            "fused fwd+bwd x | im2col fwd+bwd x | rel. error (fused / im2col) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for fused, im2col in zip(rows[0::2], rows[1::2]):
            lines.append(f"| {fused['bs']} | {fused['density']:.3f} | {fused['fwd_ms']:.1f} | "
                         f"{fused['fwd']:.2f} | {im2col['fwd']:.2f} | {fused['bwd_ms']:.1f} | "
                         f"{fused['bwd']:.2f} | {im2col['bwd']:.2f} | "
                         f"{fused['err']:.1e} / {im2col['err']:.1e} |")
        os.makedirs(args.out, exist_ok=True)
        write_section(os.path.join(args.out, "benchmarks.md"), TITLE, "\n".join(lines))
        print(f"wrote {os.path.join(args.out, 'benchmarks.md')}")
    return rows


if __name__ == "__main__":
    main()
