"""Sparse Variational Dropout on LeNet-300-100 and LeNet-5, then block-sparse inference.

Trains a dense baseline and a SparseVD network (Molchanov, Ashukha and Vetrov, ICML 2017;
initialised from the baseline, KL weight warmed up linearly and scaled by the dataset size),
prints a table in the form of the paper's (network, method, test error, per-layer sparsity,
compression), then converts the SparseVD networks' Dense layers to BlockSparseDense at a few
block sizes (keeping every block that holds a surviving weight) and prints their test error
and measured CPU inference time against the pruned dense network.

Data: scikit-learn's handwritten digits (1797 8x8 images shipped with scikit-learn, no
download; 1297 for training, 500 held out), or MNIST with --mnist DIR (the four IDX files,
optionally .gz).

    python examples/train_sparse_vd.py            # digits, both networks (a few minutes)
    python examples/train_sparse_vd.py --quick    # seconds: a smoke test
    python examples/train_sparse_vd.py --mnist ~/data/mnist --epochs 200
    python examples/train_sparse_vd.py --help
"""

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from examples.cli import fraction, positive_int, seed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mnist", metavar="DIR", help="folder with the MNIST IDX files; None means "
                   "scikit-learn's digits")
    p.add_argument("--nets", default="lenet300,lenet5", help="comma-separated: lenet300, lenet5")
    p.add_argument("--dense-epochs", type=positive_int, default=60, help="epochs of the dense baseline")
    p.add_argument("--epochs", type=positive_int, default=200, help="epochs of SparseVD training")
    p.add_argument("--warmup", default="5,20", help="KL weight: 0 before epoch A, linear to 1 "
                   "at epoch B (A,B)")
    p.add_argument("--batch", type=positive_int, default=100, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--threshold", type=float, default=3.0, help="prune log_alpha >= this")
    p.add_argument("--from-scratch", action="store_true",
                   help="do not initialise SparseVD from the dense baseline")
    p.add_argument("--block-sizes", default="1,8,16,32", help="block sizes of the conversion")
    p.add_argument("--density", type=fraction, default=None, help="also convert keeping this "
                   "fraction of blocks (largest norms)")
    p.add_argument("--timing-batch", type=positive_int, default=2048,
                   help="examples per timed inference call (test set tiled)")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed calls (median)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (data split, weights)")
    p.add_argument("--quick", action="store_true",
                   help="a few epochs, small timing (seconds); sets the epochs, warm-up, block "
                   "sizes and timing options itself")
    args = p.parse_args(argv)
    if args.quick:
        args.dense_epochs, args.epochs, args.warmup = 2, 3, "1,2"
        args.block_sizes, args.timing_batch, args.repeats = "8,32", 256, 3
    try:
        warmup = tuple(int(v) for v in args.warmup.split(","))
    except ValueError:
        warmup = ()
    if len(warmup) != 2 or not 0 <= warmup[0] <= warmup[1]:
        p.error(f"--warmup must be two integers A,B with 0 <= A <= B; got {args.warmup!r}")
    args.warmup = warmup
    try:
        args.block_sizes = [int(v) for v in args.block_sizes.split(",")]
    except ValueError:
        p.error(f"--block-sizes must be comma-separated integers; got {args.block_sizes!r}")
    if not set(args.block_sizes) <= {1, 8, 16, 32, 64}:
        p.error(f"--block-sizes must be among 1, 8, 16, 32, 64; got {args.block_sizes}")
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    if not nets or not set(nets) <= {"lenet300", "lenet5"}:
        p.error(f"--nets must name lenet300 and/or lenet5, comma-separated; got {args.nets!r}")
    args.nets = nets
    return args


# --- data -------------------------------------------------------------------------------

# --- models -----------------------------------------------------------------------------

def build_net(name, image_shape, sparse, threshold, seed):
    """LeNet-300-100 or LeNet-5 (dense Keras layers, or their SparseVD versions)."""
    import keras
    from blocksparse_tf.layers.sparse_vd import SparseVDConv2D, SparseVDDense

    seeds = iter(range(seed, seed + 100))  # a seed of its own per layer: independent noise

    def dense(units, act=None):
        if sparse:
            return SparseVDDense(units, activation=act, threshold=threshold, kl_weight=0.0,
                                 seed=next(seeds))
        return keras.layers.Dense(units, activation=act)

    def conv(filters, pad):
        if sparse:
            return SparseVDConv2D(filters, 5, padding=pad, activation="relu",
                                  threshold=threshold, kl_weight=0.0, seed=next(seeds))
        return keras.layers.Conv2D(filters, 5, padding=pad, activation="relu")

    if name == "lenet300":
        layers = [keras.Input((int(np.prod(image_shape)),)), dense(300, "relu"),
                  dense(100, "relu"), dense(10)]
    else:
        pad = "same" if image_shape[0] < 20 else "valid"  # 8x8 digits are too small for valid
        layers = [keras.Input(tuple(image_shape) + (1,)), conv(20, pad),
                  keras.layers.MaxPooling2D(2), conv(50, pad), keras.layers.MaxPooling2D(2),
                  keras.layers.Flatten(), dense(500, "relu"), dense(10)]
    return keras.Sequential(layers, name=f"{name}_{'svd' if sparse else 'dense'}")


def net_input(name, x):
    return x.reshape(len(x), -1) if name == "lenet300" else x[..., None]


def weight_layers(model):
    return [l for l in model.layers if getattr(l, "kernel", None) is not None
            or getattr(l, "theta", None) is not None]


def copy_dense_to_svd(dense_model, svd_model):
    """Initialises theta (and biases) of the SparseVD net from the trained dense one."""
    for d, s in zip(weight_layers(dense_model), weight_layers(svd_model)):
        s.theta.assign(d.kernel)
        s.bias.assign(d.bias)


def train(model, x, y, epochs, args, callbacks=()):
    import keras
    model.compile(keras.optimizers.Adam(args.lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=args.batch, epochs=epochs, verbose=0, shuffle=True,
              callbacks=list(callbacks))


def error(model, x, y):
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, -1) != y))


# --- main -------------------------------------------------------------------------------

def run_net(name, data, args):
    """Trains the dense and SparseVD versions of one net; returns table rows and the nets."""
    import keras
    from blocksparse_tf.layers.sparse_vd import KLWarmup, sparsity_report

    x_tr, y_tr, x_te, y_te = data
    xi_tr, xi_te = net_input(name, x_tr), net_input(name, x_te)
    image_shape = x_tr.shape[1:]
    keras.utils.set_random_seed(args.seed)
    dense = build_net(name, image_shape, False, args.threshold, args.seed)
    t0 = time.time()
    train(dense, xi_tr, y_tr, args.dense_epochs, args)
    n_weights = [int(np.prod(l.kernel.shape)) for l in weight_layers(dense)]
    rows = [(name, "dense", error(dense, xi_te, y_te), [0.0] * len(n_weights), 1.0,
             time.time() - t0)]
    svd = build_net(name, image_shape, True, args.threshold, args.seed)
    if not args.from_scratch:
        copy_dense_to_svd(dense, svd)
    t0 = time.time()
    warm = KLWarmup(len(y_tr), start=args.warmup[0], end=args.warmup[1])
    train(svd, xi_tr, y_tr, args.epochs, args, [warm])
    rep = sparsity_report(svd)
    rows.append((name, "SparseVD", error(svd, xi_te, y_te), [r["sparsity"] for r in rep[:-1]],
                 rep[-1]["compression"], time.time() - t0))
    return rows, svd, (xi_te, y_te)


def conversion_rows(name, svd, test, args):
    from blocksparse_tf.convert import convert_model

    x_te, y_te = test
    reps = -(-args.timing_batch // len(x_te))
    x_time = np.concatenate([x_te] * reps)[:args.timing_batch]
    rows = []
    settings = [(bs, None) for bs in args.block_sizes]
    if args.density is not None:
        settings += [(bs, args.density) for bs in args.block_sizes]
    for bs, density in settings:
        new, rep = convert_model(svd, bs, density=density, x=x_time, repeats=args.repeats)
        _, acc = convert_model(svd, bs, density=density, x=x_te, y=y_te, repeats=1)
        blocks = sum(r["blocks"] for r in rep["layers"])
        total = sum(r["blocks_total"] for r in rep["layers"])
        stored = sum(r["stored_weights"] for r in rep["layers"])
        rows.append((name, bs, "surviving" if density is None else f"top {density:g}",
                     blocks / total, stored, acc["error_before"], acc["error_after"],
                     rep["dense_ms"], rep["sparse_ms"], rep["speedup"]))
    return rows


def print_tables(train_rows, conv_rows, args, data_name, n_train, n_test):
    print(f"\n## {data_name}: {n_train} training / {n_test} test examples")
    print("\n| network | method | error | per-layer sparsity (%) | compression | train time |")
    print("|---|---|---|---|---|---|")
    for name, method, err, sp, comp, secs in train_rows:
        net = "LeNet-300-100" if name == "lenet300" else "LeNet-5"
        per = " - ".join(f"{100 * s:.1f}" for s in sp)
        print(f"| {net} | {method} | {100 * err:.2f}% | {per} | {comp:.1f}x | {secs:.0f} s |")
    print(f"\nBlock-sparse conversion of the SparseVD networks' Dense layers (inference on "
          f"{args.timing_batch} examples per call, median of {args.repeats}; speedup against "
          "the pruned dense Keras model):\n")
    print("| network | block size | which blocks | block density | stored weights | error "
          "(pruned dense) | error (block-sparse) | dense ms | block-sparse ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, bs, kept, dens, stored, e0, e1, dms, sms, sp in conv_rows:
        net = "LeNet-300-100" if name == "lenet300" else "LeNet-5"
        print(f"| {net} | {bs} | {kept} | {100 * dens:.1f}% | {stored} | {100 * e0:.2f}% | "
              f"{100 * e1:.2f}% | {dms:.2f} | {sms:.2f} | {sp:.2f}x |")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from blocksparse_tf import datasets

    if args.mnist:
        data, data_name = datasets.load_mnist(args.mnist), "MNIST"
    else:
        data, data_name = datasets.load_digits(n_test=500, seed=args.seed), "scikit-learn digits"
    if args.quick:
        data = (data[0][:300], data[1][:300], data[2][:200], data[3][:200])
    started = time.time()
    train_rows, conv_rows = [], []
    for name in args.nets:
        rows, svd, test = run_net(name, data, args)
        train_rows += rows
        conv_rows += conversion_rows(name, svd, test, args)
    print_tables(train_rows, conv_rows, args, data_name, len(data[1]), len(data[3]))
    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, TensorFlow {tf.__version__}, "
          f"{datetime.date.today().isoformat()}, {time.time() - started:.0f} s in all; command: "
          f"python examples/train_sparse_vd.py {' '.join(sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
