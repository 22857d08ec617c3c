"""A small CNN with dense 3x3 convolutions against the same CNN with wider block-sparse ones.

Trains, on scikit-learn's bundled handwritten digits (8x8 images, 1797 examples; no download) or
on MNIST from IDX files (``--mnist DIR``), two convolutional networks of the same shape:

    stem:  dense 3x3 convolution, 1 -> width channels, ReLU, 2x2 max pooling
    body:  ``--layers`` 3x3 convolutions, width -> width channels, SAME, ReLU
    head:  global average pooling, dense softmax classifier

In the dense network the body convolutions are ``keras.layers.Conv2D`` with ``--dense-width``
channels; in the block-sparse network they are ``BlockSparseConv2D`` with ``--sparse-width``
channels and a bipartite small-world layout of density (dense-width / sparse-width)^2, so each
body convolution has exactly as many weights as its dense counterpart (the stem and classifier,
which stay dense, are wider).  Reports test accuracy, parameter counts and the measured CPU
inference time of both as a Markdown table.

    python examples/train_conv.py              # digits, the table of docs/conv_results.md
    python examples/train_conv.py --quick      # tiny, for the tests (seconds)
    python examples/train_conv.py --mnist DIR  # DIR holds train-images-idx3-ubyte(.gz) ...
"""

import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from examples.cli import positive_int, refuse_nondividing, seed  # noqa: E402
from blocksparse_tf import datasets  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mnist", metavar="DIR", default=None,
                   help="use MNIST from the IDX files in DIR instead of the bundled digits")
    p.add_argument("--dense-width", type=positive_int, default=64,
                   help="channels of the dense network")
    p.add_argument("--sparse-width", type=positive_int, default=256,
                   help="channels of the block-sparse network")
    p.add_argument("--block-size", type=int, default=16,
                   help="block size of the block-sparse convolutions (divides --dense-width)")
    p.add_argument("--layers", type=positive_int, default=2, help="3x3 convolutions in the body")
    p.add_argument("--epochs", type=positive_int, default=15, help="training epochs per model")
    p.add_argument("--batch", type=positive_int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--timing-repeats", type=positive_int, default=20,
                   help="timed forward passes of the test set per model (the median is reported)")
    p.add_argument("--seed", type=seed, default=0,
                   help="random seed (weights, layouts, shuffling); not the train/test split, "
                   "which is fixed")
    p.add_argument("--out", default=None,
                   help="Markdown file for the results table; None means docs/conv_results.md "
                        "(docs/conv_results_quick.md with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny networks, 2 epochs (seconds); sets --dense-width, --sparse-width, "
                   "--block-size, --layers, --epochs and --timing-repeats itself")
    args = p.parse_args(argv)
    if args.out is None:  # a smoke test leaves the committed results alone
        name = "conv_results_quick.md" if args.quick else "conv_results.md"
        args.out = os.path.join(ROOT, "docs", name)
    if args.quick:
        args.dense_width, args.sparse_width, args.block_size, args.layers = 16, 32, 8, 1
        args.epochs, args.timing_repeats = 2, 3
    if args.block_size not in (1, 8, 16, 32, 64):
        p.error(f"--block-size must be one of 1, 8, 16, 32, 64; got {args.block_size}")
    refuse_nondividing(p, "--block-size", [args.block_size], [args.dense_width, args.sparse_width],
                       f"--dense-width ({args.dense_width}) and --sparse-width "
                       f"({args.sparse_width})")
    if args.sparse_width < args.dense_width:
        p.error(f"--sparse-width ({args.sparse_width}) must be at least --dense-width "
                f"({args.dense_width})")
    return args


def load_data(args):
    """(x_train, y_train, x_test, y_test, name): float32 images (n, H, W, 1) in [0, 1]."""
    if args.mnist:
        xtr, ytr, xte, yte = datasets.load_mnist(args.mnist)
        if args.quick:
            xtr, ytr, xte, yte = xtr[:1000], ytr[:1000], xte[:200], yte[:200]
        name = "MNIST"
    else:
        # A fixed split, whatever --seed: a fifth of the 1797 images for testing.
        xtr, ytr, xte, yte = datasets.load_digits(n_test=1797 // 5, seed=12345)
        if args.quick:
            xtr, ytr = xtr[:400], ytr[:400]
        name = "scikit-learn digits"
    return xtr[..., None], ytr, xte[..., None], yte, name


def build_model(keras, input_shape, classes, width, body):
    """stem -> body (a function layer index -> conv layer) -> head."""
    layers = [keras.Input(input_shape),
              keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="stem"),
              keras.layers.MaxPooling2D(2)]
    layers += [body(i) for i in range(body.count)]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(classes, name="classifier")]
    return keras.Sequential(layers)


def time_forward(fn, x, repeats):
    """Median wall time (ms) of one inference pass of fn on x, after two warm-up passes."""
    for _ in range(2):
        fn(x).numpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main(argv=None):
    args = parse_args(argv)
    import keras
    import tensorflow as tf

    from benchmarks.report import machine_description
    from blocksparse_tf.layers.conv import BlockSparseConv2D

    xtr, ytr, xte, yte, data_name = load_data(args)
    classes = int(max(ytr.max(), yte.max()) + 1)
    density = (args.dense_width / args.sparse_width) ** 2
    want_blocks = (args.dense_width // args.block_size) ** 2
    print(f"{data_name}: {len(xtr)} training, {len(xte)} test images of {xtr.shape[1:3]}, "
          f"{classes} classes; dense width {args.dense_width}, block-sparse width "
          f"{args.sparse_width} (block {args.block_size}, density {density:.4f})", flush=True)

    def dense_body(i):
        return keras.layers.Conv2D(args.dense_width, 3, padding="same", activation="relu",
                                   name=f"conv_{i}")

    def sparse_body(i):
        layout = {"generator": "bipartite_small_world", "density": density, "seed": args.seed + i}
        return BlockSparseConv2D(args.sparse_width, 3, block_size=args.block_size, layout=layout,
                                 padding="same", activation="relu", name=f"bsconv_{i}")

    dense_body.count = sparse_body.count = args.layers
    xte_t = tf.constant(xte)
    rows = []
    for name, width, body in [("dense Conv2D", args.dense_width, dense_body),
                              ("BlockSparseConv2D", args.sparse_width, sparse_body)]:
        keras.utils.set_random_seed(args.seed)
        model = build_model(keras, xtr.shape[1:], classes, width, body)
        body_layers = [l for l in model.layers if l.name.startswith(("conv_", "bsconv_"))]
        if name.startswith("BlockSparse"):
            blocks = [l.bsmm.blocks for l in body_layers]
            if any(b != want_blocks for b in blocks):
                print(f"note: layouts have {blocks} blocks, not {want_blocks} each")
        model.compile(optimizer=keras.optimizers.Adam(args.lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        t0 = time.perf_counter()
        model.fit(xtr, ytr, batch_size=args.batch, epochs=args.epochs, verbose=0, shuffle=True)
        train_s = time.perf_counter() - t0
        acc = model.evaluate(xte, yte, verbose=0, return_dict=True)["accuracy"]
        ms = time_forward(tf.function(lambda x, m=model: m(x, training=False)), xte_t,
                          args.timing_repeats)
        row = dict(name=name, width=width, params=model.count_params(),
                   body_params=sum(l.count_params() for l in body_layers),
                   density=density if name.startswith("BlockSparse") else 1.0,
                   acc=100 * acc, ms=ms, train_s=train_s)
        rows.append(row)
        print(f"{name}: width {width}, {row['params']} parameters ({row['body_params']} in the "
              f"3x3 body), test accuracy {row['acc']:.2f}%, inference {ms:.2f} ms, "
              f"training {train_s:.1f} s", flush=True)

    command = "python examples/train_conv.py"
    given = list(sys.argv[1:] if argv is None else argv)
    if "--out" in given:  # the output file is not part of the experiment
        i = given.index("--out")
        del given[i:i + 2]
    command = " ".join([command] + given)
    lines = [
        f"# BlockSparseConv2D against Conv2D at equal parameter count ({data_name})",
        "",
        f"- Machine: {machine_description()}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Command: `{command}`",
        f"- Data: {data_name}, {len(xtr)} training / {len(xte)} test images of "
        f"{xtr.shape[1]}x{xtr.shape[2]}. Network: dense 3x3 stem (1 -> width, ReLU), 2x2 max "
        f"pooling, {args.layers} 3x3 SAME convolutions width -> width with ReLU (the body), global "
        f"average pooling, dense classifier. The body is `keras.layers.Conv2D` in the dense "
        f"network and `BlockSparseConv2D` (block {args.block_size}, bipartite small-world layout "
        f"of density {density:.4f}) in the block-sparse one, with the same number of weights.",
        f"- {args.epochs} epochs of Adam (learning rate {args.lr}, batch {args.batch}), seed "
        f"{args.seed}. Inference: median of {args.timing_repeats} forward passes of the whole "
        f"test set ({len(xte)} images) in `tf.function` on the CPU. Training time is wall time "
        f"of `fit` on the same CPU.",
        "",
        "| model | width | body density | parameters (total) | parameters (3x3 body) | "
        "test accuracy (%) | inference (ms) | training (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['width']} | {r['density']:.4f} | {r['params']:,} | "
              f"{r['body_params']:,} | {r['acc']:.2f} | {r['ms']:.2f} | {r['train_s']:.1f} |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
