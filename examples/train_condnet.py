"""Conditional computation (condnet) against a dense network of the same shape.

Trains, on scikit-learn's bundled handwritten digits (8x8 images, 1797 examples; no download) or
on MNIST from IDX files (``--mnist DIR``), a dense ReLU network and condnets of the same shape
(``blocksparse_tf.layers.CondNetModel``) for a few target active fractions tau.  Reports the test
error, the fraction of blocks active in each hidden layer at inference (thresholded policy) and
the measured CPU inference time of every model on the same batch, as a markdown table, and plots
test accuracy against the active fraction.

    python examples/train_condnet.py             # digits, the table of docs/condnet.md
    python examples/train_condnet.py --quick     # tiny, for the tests (seconds)
    python examples/train_condnet.py --mnist DIR # DIR holds train-images-idx3-ubyte(.gz) ...
"""

import argparse
import datetime
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from examples.cli import positive_int, seed  # noqa: E402
from blocksparse_tf import datasets  # noqa: E402


def parse_taus(text):
    """The comma-separated target active fractions as floats, or None unless each is a number
    strictly between 0 and 1."""
    try:
        taus = [float(v) for v in text.split(",")]
    except ValueError:
        return None
    return taus if all(0 < t < 1 for t in taus) else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mnist", metavar="DIR", default=None,
                   help="use MNIST from the IDX files in DIR instead of the bundled digits")
    p.add_argument("--hidden", default="1024,1024", help="hidden layer sizes, comma-separated")
    p.add_argument("--block-size", type=int, default=32, help="units per policy decision")
    p.add_argument("--taus", default="0.125,0.25,0.5",
                   help="target active fractions, one condnet each, comma-separated")
    p.add_argument("--lambda-b", type=float, default=20.0, help="batch-wise sparsity weight")
    p.add_argument("--lambda-e", type=float, default=0.001, help="example-wise sparsity weight")
    p.add_argument("--lambda-v", type=float, default=5.0, help="variance term weight")
    p.add_argument("--baseline", default="batch", choices=["none", "batch", "moving_average"],
                   help="REINFORCE baseline")
    p.add_argument("--epochs", type=positive_int, default=40, help="training epochs per model")
    p.add_argument("--batch", type=positive_int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--timing-repeats", type=positive_int, default=30,
                   help="timed forward passes per model (the median is reported)")
    p.add_argument("--seed", type=seed, default=0,
                   help="random seed (weights, masks); not the train/test split, which is fixed")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"),
                   help="folder for condnet_results*.md and condnet_accuracy_vs_active*.png")
    p.add_argument("--quick", action="store_true",
                   help="tiny models, a few epochs (seconds); sets --hidden, --block-size, "
                   "--taus, --epochs and --timing-repeats itself")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.block_size, args.taus, args.epochs = "64,64", 16, "0.5,0.75", 3
        args.timing_repeats = 3
    if args.block_size not in (1, 8, 16, 32, 64):
        p.error(f"--block-size must be one of 1, 8, 16, 32, 64; got {args.block_size}")
    try:
        hidden = [int(v) for v in args.hidden.split(",")]
    except ValueError:
        hidden = []
    if not hidden or any(h <= 0 or h % args.block_size for h in hidden):
        p.error(f"--hidden must be comma-separated positive multiples of --block-size "
                f"({args.block_size}); got {args.hidden!r}")
    taus = parse_taus(args.taus)
    if taus is None:
        p.error(f"--taus must be comma-separated numbers strictly between 0 and 1; "
                f"got {args.taus!r}")
    args.taus = taus
    return args


def load_data(args):
    """(x_train, y_train, x_test, y_test, name): float32 features in [0, 1], int labels."""
    if args.mnist:
        xtr, ytr, xte, yte = datasets.load_mnist(args.mnist)
        xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
        if args.quick:
            xtr, ytr, xte, yte = xtr[:2000], ytr[:2000], xte[:500], yte[:500]
        return xtr, ytr, xte, yte, "MNIST"
    # A fixed split, whatever --seed: a fifth of the 1797 images for testing.
    xtr, ytr, xte, yte = datasets.load_digits(n_test=1797 // 5, seed=12345)
    return xtr.reshape(len(xtr), -1), ytr, xte.reshape(len(xte), -1), yte, "scikit-learn digits"


def dense_model(keras, hidden, classes):
    layers = [keras.layers.Dense(h, activation="relu", name=f"dense_{i}")
              for i, h in enumerate(hidden)]
    return keras.Sequential(layers + [keras.layers.Dense(classes, name="classifier")])


def time_forward(tf, fn, x, repeats):
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

    from blocksparse_tf.layers.condnet import CondNetModel

    hidden = [int(h) for h in args.hidden.split(",")]
    xtr, ytr, xte, yte, data_name = load_data(args)
    classes = int(max(ytr.max(), yte.max()) + 1)
    print(f"{data_name}: {len(xtr)} training, {len(xte)} test examples, {xtr.shape[1]} features, "
          f"{classes} classes; hidden {hidden}, block size {args.block_size}")
    xte_t = tf.constant(xte)
    rows = []

    keras.utils.set_random_seed(args.seed)
    dense = dense_model(keras, hidden, classes)
    dense.compile(optimizer=keras.optimizers.Adam(args.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    t0 = time.perf_counter()
    dense.fit(xtr, ytr, batch_size=args.batch, epochs=args.epochs, verbose=0)
    train_s = time.perf_counter() - t0
    acc = dense.evaluate(xte, yte, verbose=0, return_dict=True)["accuracy"]
    ms = time_forward(tf, tf.function(lambda x: dense(x, training=False)), xte_t,
                      args.timing_repeats)
    rows.append(dict(name="dense", tau=None, err=100 * (1 - acc), active=[1.0] * len(hidden),
                     ms=ms, train_s=train_s, err_s=None, active_s=None))
    print(f"dense: test error {rows[-1]['err']:.2f}%, {ms:.2f} ms")

    for tau in args.taus:
        keras.utils.set_random_seed(args.seed)
        model = CondNetModel(hidden, classes, block_size=args.block_size, tau=tau,
                             lambda_b=args.lambda_b, lambda_e=args.lambda_e,
                             lambda_v=args.lambda_v,
                             baseline=None if args.baseline == "none" else args.baseline,
                             seed=args.seed)
        model.compile(optimizer=keras.optimizers.Adam(args.lr))
        t0 = time.perf_counter()
        model.fit(xtr, ytr, batch_size=args.batch, epochs=args.epochs, verbose=0)
        train_s = time.perf_counter() - t0
        logits, _, masks = model.forward(xte_t, training=False)
        acc = float(np.mean(np.argmax(logits.numpy(), axis=1) == yte))
        active = [float(np.mean(m.numpy())) for m in masks]
        # sampled masks instead of thresholded ones (training=True only changes the masks)
        logits_s, _, masks_s = model.forward(xte_t, training=True)
        err_s = 100 * (1 - float(np.mean(np.argmax(logits_s.numpy(), axis=1) == yte)))
        active_s = float(np.mean([np.mean(m.numpy()) for m in masks_s]))
        ms = time_forward(tf, tf.function(lambda x: model(x, training=False)), xte_t,
                          args.timing_repeats)
        rows.append(dict(name="condnet", tau=tau, err=100 * (1 - acc), active=active, ms=ms,
                         train_s=train_s, err_s=err_s, active_s=active_s))
        print(f"condnet tau={tau}: test error {rows[-1]['err']:.2f}%, active "
              f"{', '.join(f'{a:.3f}' for a in active)}, {ms:.2f} ms")

    suffix = "_quick" if args.quick else ""
    os.makedirs(args.out, exist_ok=True)
    dense_ms = rows[0]["ms"]
    lines = [
        f"Condnet vs dense on {data_name} ({len(xtr)} train / {len(xte)} test), hidden "
        f"{'x'.join(map(str, hidden))}, block size {args.block_size}, {args.epochs} epochs, "
        f"lambda_b {args.lambda_b}, lambda_e {args.lambda_e}, lambda_v {args.lambda_v}, "
        f"baseline {args.baseline}; inference with thresholded policies (p > 0.5); time: median "
        f"of {args.timing_repeats} forward passes of the whole test set ({len(xte)} rows), "
        f"CPU, {os.cpu_count()} logical cores, {platform.processor() or platform.machine()}, "
        f"{datetime.date.today().isoformat()}.",
        "",
        "| model | tau | test error (%) | active fraction per layer | inference (ms) | "
        "speed vs dense | training (s) | error, sampled masks (%) | active, sampled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {'-' if r['tau'] is None else r['tau']} | {r['err']:.2f} | "
                     f"{', '.join(f'{a:.3f}' for a in r['active'])} | {r['ms']:.2f} | "
                     f"{dense_ms / r['ms']:.2f}x | {r['train_s']:.1f} | "
                     + ("- | - |" if r["err_s"] is None
                        else f"{r['err_s']:.2f} | {r['active_s']:.3f} |"))
    table = "\n".join(lines) + "\n"
    report = os.path.join(args.out, f"condnet_results{suffix}.md")
    with open(report, "w") as f:
        f.write(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    cond = rows[1:]
    xs = [float(np.mean(r["active"])) for r in cond]
    ys = [100 - r["err"] for r in cond]
    ax.plot(xs, ys, "o-", label="condnet")
    for r, xv, yv in zip(cond, xs, ys):
        ax.annotate(f"tau={r['tau']:g}", (xv, yv), textcoords="offset points", xytext=(5, -12))
    ax.plot([1.0], [100 - rows[0]["err"]], "s", color="k", label="dense")
    ax.set_xlabel("fraction of hidden blocks active (test set)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 1.05)
    ax.set_title(f"Condnet on {data_name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    png = os.path.join(args.out, f"condnet_accuracy_vs_active{suffix}.png")
    fig.savefig(png, dpi=110)
    print(f"wrote {report} and {png}")


if __name__ == "__main__":
    main()
