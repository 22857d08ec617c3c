"""The README example, run for real: a 4096 x 4096 block-sparse layer (block 32), minibatch 64.

Checks the product and both gradients against the dense product on the same masked weights,
then times the block-sparse op against dense tf.matmul.

    python examples/demo.py                  # the documented example: random 0/1 layout (~50%)
    python examples/demo.py --density 0.1    # a sparser random layout
"""

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from blocksparse_tf import BlocksparseMatMul  # noqa: E402
from examples.cli import fraction, positive_int, refuse_nondividing, seed  # noqa: E402

BLOCK_SIZES = (1, 8, 16, 32, 64)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=positive_int, default=4096, help="C = K (default 4096)")
    parser.add_argument("--block-size", type=int, default=32, choices=BLOCK_SIZES,
                        help="block size, dividing --hidden (default 32)")
    parser.add_argument("--batch", type=positive_int, default=64, help="minibatch N (default 64)")
    parser.add_argument("--density", type=fraction, default=None,
                        help="fraction of blocks present, in (0, 1] (default: np.random.randint(2), "
                             "about 0.5)")
    parser.add_argument("--repeats", type=positive_int, default=10,
                        help="timed runs per product (default 10)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the layout, weights and inputs")
    args = parser.parse_args(argv)
    refuse_nondividing(parser, "--block-size", [args.block_size], [args.hidden],
                       f"--hidden ({args.hidden})")
    return args


def best_time(fn, repeats):
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    args = parse_args(argv)
    np.random.seed(args.seed)
    blocks_per_side = args.hidden // args.block_size
    if args.density is None:
        sparsity = np.random.randint(2, size=(blocks_per_side, blocks_per_side))
    else:
        sparsity = np.random.random_sample((blocks_per_side, blocks_per_side)) < args.density
    if not sparsity.any():  # a layer needs a block; tiny layers at low density may draw none
        sparsity[0, 0] = 1

    bsmm = BlocksparseMatMul(sparsity, block_size=args.block_size)
    print(bsmm)
    w = tf.Variable(bsmm.ortho_init(seed=args.seed), shape=bsmm.w_shape)
    x = tf.constant(np.random.standard_normal((args.batch, args.hidden)).astype(np.float32))
    dy = tf.constant(np.random.standard_normal((args.batch, args.hidden)).astype(np.float32))

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bsmm(x, w)
    dx, dw = tape.gradient(y, [x, w], output_gradients=dy)

    # The same product, dense, on the masked weights.
    W = tf.constant(bsmm.to_dense(w.numpy()))
    with tf.GradientTape() as tape:
        tape.watch([x, W])
        y_dense = tf.matmul(x, W)
    dx_dense, dW_dense = tape.gradient(y_dense, [x, W], output_gradients=dy)

    def rel(a, b):
        return float(tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(b)))

    errors = {"y": rel(y, y_dense), "dx": rel(dx, dx_dense), "dw": rel(dw, bsmm.from_dense(dW_dense))}
    print("max relative difference to the dense product: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    if not all(math.isfinite(e) and e <= 1e-4 for e in errors.values()):  # NaN fails too
        raise SystemExit("block-sparse result differs from the dense product")

    # Eager calls return once computed (synchronous execution, TensorFlow's default), so the
    # timings need no host copy of the result.
    sparse_fwd = best_time(lambda: bsmm(x, w), args.repeats)
    dense_fwd = best_time(lambda: tf.matmul(x, W), args.repeats)
    print(f"forward, minibatch {args.batch}: block-sparse {sparse_fwd * 1e3:.2f} ms, "
          f"dense tf.matmul {dense_fwd * 1e3:.2f} ms, speedup {dense_fwd / sparse_fwd:.2f}x "
          f"at density {bsmm.density:.2f} (ideal {1 / bsmm.density:.2f}x)")
    return errors


if __name__ == "__main__":
    main()
