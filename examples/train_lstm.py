"""Character-level language model: dense LSTM vs a wider small-world block-sparse LSTM.

Both models are Embedding -> LSTM -> Dense(softmax over characters) with (nearly) the same
number of parameters: the block-sparse LSTM is wider, its recurrent weights have a
Watts-Strogatz layout of the chosen density (its input weights a bipartite small-world one,
or dense with --no-sparse-input); the dense width is then solved for so
that the two parameter counts match.  The script trains them one after the other on the
same batches, and reports held-out bits per character, training speed and parameter counts
in a Markdown table, and a plot of validation bits per character against training steps.

Default corpus: data/kjv.txt.xz (the King James Bible, 4.3 MB of English; see data/README.md).
Any other text file: --data PATH (plain, .gz, .bz2 or .xz), e.g. enwik8 or text8.

    python examples/train_lstm.py                 # the comparison (tens of minutes on 2 cores)
    python examples/train_lstm.py --quick         # a few seconds: a smoke test
    python examples/train_lstm.py --compare-fused # time the fused weight gradient
    python examples/train_lstm.py --help

Several processes or machines: set TF_CONFIG in each (see docs/layers.md) and pass
--multi-worker; the global batch (--batch) is split over the workers.
"""

import argparse
import bz2
import gzip
import lzma
import math
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from examples.cli import positive_int, refuse_nondividing, seed  # noqa: E402
DEFAULT_DATA = os.path.join(ROOT, "data", "kjv.txt.xz")
MIN_CHARS = 10_000  # the least text read_text takes


def held_out_chars(n):
    """Characters in the held-out part (the last 5%) of a text of n characters."""
    return n - int(n * 0.95)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="text file (plain, .gz, .bz2, .xz)")
    p.add_argument("--max-chars", type=int, default=0, help="use only the first N characters "
                   "(0: all)")
    p.add_argument("--sparse-units", type=positive_int, default=1536,
                   help="block-sparse LSTM width")
    p.add_argument("--block-size", type=int, default=32, help="block size of the sparse weights")
    p.add_argument("--density", type=float, default=1 / 16,
                   help="density of the Watts-Strogatz recurrent layout")
    p.add_argument("--sparse-input", action=argparse.BooleanOptionalAction, default=True,
                   help="block-sparse input projection too (bipartite small world)")
    p.add_argument("--embed", type=positive_int, default=64, help="character embedding size")
    p.add_argument("--seq-len", type=positive_int, default=64,
                   help="characters per training sequence")
    p.add_argument("--batch", type=positive_int, default=32, help="global batch size")
    p.add_argument("--steps", type=positive_int, default=1200, help="training steps per model")
    p.add_argument("--eval-every", type=positive_int, default=100,
                   help="steps between validations")
    p.add_argument("--val-batches", type=positive_int, default=20,
                   help="held-out batches per validation")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--seed", type=seed, default=0, help="random seed (weights, layout, batches)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"),
                   help="folder for lstm_results.md and lstm_bpc.png")
    p.add_argument("--quick", action="store_true",
                   help="tiny models, a few steps (seconds); sets --sparse-units, --block-size, "
                   "--embed, --density, --seq-len, --batch, --steps, --eval-every, "
                   "--val-batches and --max-chars itself")
    p.add_argument("--multi-worker", action="store_true",
                   help="train under MultiWorkerMirroredStrategy (TF_CONFIG must be set)")
    p.add_argument("--compare-fused", action="store_true",
                   help="only time a training step with and without the fused weight gradient")
    args = p.parse_args(argv)
    if args.quick:
        args.sparse_units, args.block_size, args.embed = 128, 16, 16
        args.density = 0.25
        args.seq_len, args.batch, args.steps = 16, 8, 6
        args.eval_every, args.val_batches, args.max_chars = 3, 2, 200_000
    if args.block_size not in (1, 8, 16, 32, 64):
        p.error(f"--block-size must be one of 1, 8, 16, 32, 64; got {args.block_size}")
    refuse_nondividing(p, "--block-size", [args.block_size], [args.sparse_units],
                       f"--sparse-units ({args.sparse_units})")
    if not 0 < args.density <= 1:
        p.error(f"--density must be in (0, 1]; got {args.density:g}")
    if args.max_chars < 0:
        p.error(f"--max-chars must be >= 0 (0: all); got {args.max_chars}")
    if not args.compare_fused:  # the timing of --compare-fused reads no text
        if 0 < args.max_chars < MIN_CHARS:
            p.error(f"--max-chars must be 0 (all) or at least {MIN_CHARS:,}; "
                    f"got {args.max_chars}")
        if args.max_chars and held_out_chars(args.max_chars) <= args.seq_len + 1:
            p.error(f"--max-chars {args.max_chars} holds out {held_out_chars(args.max_chars)} "
                    f"characters (the last 5%), which must be more than --seq-len + 1 "
                    f"({args.seq_len + 1})")
        if not os.path.isfile(args.data):
            p.error(f"--data: no such file: {args.data!r}")
    return args


# ---- data -------------------------------------------------------------------------------
def read_text(path, max_chars=0):
    """The whole file as a str; compressed files are recognised by their extension."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(
        os.path.splitext(path)[1], open)
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read(max_chars) if max_chars else f.read()
    if len(text) < MIN_CHARS:
        raise SystemExit(f"{path}: only {len(text)} characters; need at least {MIN_CHARS:,}")
    return text


def encode(text):
    """int32 character ids and the vocabulary (sorted characters)."""
    vocab = sorted(set(text))
    table = {c: i for i, c in enumerate(vocab)}
    return np.fromiter((table[c] for c in text), dtype=np.int32, count=len(text)), vocab


def batches(ids, batch, seq_len, seed):
    """Endless tf.data stream of random (input, next-character) windows."""
    import tensorflow as tf

    ids = tf.constant(ids)
    n = int(ids.shape[0]) - seq_len - 1

    def window(r):
        start = tf.math.floormod(r, n)
        w = ids[start:start + seq_len + 1]
        return w[:-1], w[1:]

    return (tf.data.Dataset.random(seed=seed).map(window).batch(batch, drop_remainder=True)
            .prefetch(2))


def fixed_batches(ids, batch, seq_len, count, seed):
    """``count`` batches of held-out windows, the same for every model and validation."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq_len - 1, size=count * batch)
    x = np.stack([ids[s:s + seq_len] for s in starts])
    y = np.stack([ids[s + 1:s + seq_len + 1] for s in starts])
    return x, y


# ---- models -----------------------------------------------------------------------------
def build_model(kind, units, vocab, args):
    import keras

    from blocksparse_tf.layers import BlockSparseLSTM

    inputs = keras.Input((args.seq_len,), dtype="int32")
    h = keras.layers.Embedding(vocab, args.embed)(inputs)
    if kind == "dense":
        h = keras.layers.LSTM(units, return_sequences=True)(h)
    else:
        layout = {"generator": "watts_strogatz", "density": args.density}
        sparse_input = args.sparse_input and args.embed % args.block_size == 0
        h = BlockSparseLSTM(units, block_size=args.block_size, layout=layout,
                            sparse_input=sparse_input,
                            input_layout={"generator": "bipartite_small_world",
                                          "density": args.density} if sparse_input else None,
                            return_sequences=True)(h)
    outputs = keras.layers.Dense(vocab)(h)
    model = keras.Model(inputs, outputs, name=f"{kind}_lstm_{units}")
    model.compile(keras.optimizers.Adam(args.lr, clipnorm=1.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def dense_params(units, vocab, embed):
    """Parameters of Embedding -> LSTM(units) -> Dense(vocab)."""
    return vocab * embed + 4 * (embed * units + units * units + units) + units * vocab + vocab


def matching_dense_units(target, vocab, embed):
    """The dense LSTM width whose model has the parameter count closest to ``target``."""
    a, b, c = 4, 4 * embed + 4 + vocab, vocab * embed + vocab - target
    guess = int((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    return min((guess, guess + 1), key=lambda u: abs(dense_params(u, vocab, embed) - target))


# ---- training ---------------------------------------------------------------------------
def make_strategy(multi_worker):
    import tensorflow as tf

    if multi_worker:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()  # the default (no-op) strategy


class ValidationCurve:
    """Scores a model on fixed held-out windows (the same for both models)."""

    def __init__(self, val_x, val_y, batch):
        self.val_x, self.val_y, self.batch = val_x, val_y, batch

    def bpc(self, model):
        """Mean held-out cross-entropy in bits per character.

        A plain loop rather than ``model.evaluate``: it works the same under any strategy
        (every worker scores the whole held-out set with its replica of the weights).
        """
        import keras

        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        total = 0.0
        for i in range(0, len(self.val_x), self.batch):
            logits = model(self.val_x[i:i + self.batch], training=False)
            total += float(loss_fn(self.val_y[i:i + self.batch], logits)) * len(logits)
        return total / len(self.val_x) / math.log(2)


def train(kind, units, vocab, train_ids, val, args, strategy):
    """Trains one model; returns its results row and validation curve."""
    import keras

    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        model = build_model(kind, units, vocab, args)
    params = model.count_params()
    data = batches(train_ids, args.batch, args.seq_len, args.seed)
    if args.multi_worker:
        data = iter(strategy.experimental_distribute_dataset(data))
    steps, curve, train_time, timed_steps = 0, [(0, val.bpc(model))], 0.0, 0
    print(f"\n{model.name}: {params:,} parameters; step 0 validation bpc {curve[0][1]:.3f}")
    while steps < args.steps:
        chunk = min(args.eval_every, args.steps - steps)
        start = time.perf_counter()
        # Keras' own progress bar, one "epoch" per validation interval.
        if args.multi_worker:
            fit_distributed(model, data, chunk, strategy, args.batch)
        else:
            model.fit(data, steps_per_epoch=chunk, epochs=1, shuffle=False,
                      verbose=1 if sys.stdout.isatty() else 2)
        if steps > 0 or chunk == args.steps:  # the first interval pays for tracing: skip it
            train_time += time.perf_counter() - start
            timed_steps += chunk
        steps += chunk
        curve.append((steps, val.bpc(model)))
        print(f"{model.name}: step {steps} validation bpc {curve[-1][1]:.4f}")
    chars = timed_steps * args.batch * args.seq_len
    row = {"model": kind, "units": units, "params": params, "bpc": curve[-1][1],
           "best_bpc": min(b for _, b in curve), "chars_per_s": chars / train_time,
           "seconds": train_time}
    return row, curve, model


def fit_distributed(model, data, steps, strategy, global_batch):
    """``steps`` data-parallel training steps with a Keras progress bar.

    Keras 3.15's ``model.fit`` fails under MultiWorkerMirroredStrategy before its first
    step, so multi-worker runs use this loop: each worker computes the loss of its share of
    the global batch, scaled by the global batch size; the strategy sums the gradients.
    """
    import keras
    import tensorflow as tf

    if not hasattr(model, "_bs_train_step"):
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean(loss_fn(y, model(x, training=True)), axis=-1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        model._bs_train_step = tf.function(
            lambda batch: strategy.reduce("SUM", strategy.run(replica_step, args=batch), None))
    bar = keras.utils.Progbar(steps)
    for i in range(steps):
        bar.update(i + 1, [("loss", float(model._bs_train_step(next(data))))])


def describe_layout(model):
    from blocksparse_tf.layers import BlockSparseLSTM

    for layer in model.layers:
        if isinstance(layer, BlockSparseLSTM):
            rec = layer.cell.recurrent_bsmm
            return f"block {rec.block_size}, recurrent density {rec.density:.4f}"
    return "dense"


def write_results(rows, curves, layouts_text, args, text_len, vocab):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    plot = os.path.join(args.out, "lstm_bpc.png" if not args.quick else "lstm_bpc_quick.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for row, curve in zip(rows, curves):
        s, b = zip(*curve)
        ax.plot(s, b, marker="o", label=f"{row['model']} {row['units']} ({row['params']:,} params)")
    ax.set_xlabel("training steps")
    ax.set_ylabel("validation bits per character")
    ax.set_ylim(top=min(8.0, max(max(b for _, b in c) for c in curves) + 0.2))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    lines = [
        "| model | hidden units | layout | parameters | held-out bpc (final) | best bpc | train chars/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, lay in zip(rows, layouts_text):
        lines.append(f"| {row['model']} | {row['units']} | {lay} | {row['params']:,} | "
                     f"{row['bpc']:.4f} | {row['best_bpc']:.4f} | {row['chars_per_s']:,.0f} |")
    table = "\n".join(lines)
    command = "python examples/train_lstm.py " + " ".join(args.given)
    data_name = os.path.relpath(args.data, ROOT) if args.data.startswith(ROOT) else \
        os.path.basename(args.data)
    report = "\n".join([
        "# Dense vs small-world block-sparse LSTM: character-level language model",
        "",
        f"- command: `{command.strip()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        f"- data: `{data_name}`, {text_len:,} characters, vocabulary {vocab}; last 5% held out",
        f"- {args.steps} steps of batch {args.batch} x {args.seq_len} characters per model, "
        f"Adam {args.lr}, embedding {args.embed}",
        "",
        table,
        "",
        f"![validation bpc]({os.path.basename(plot)})",
        "",
    ])
    name = "lstm_results.md" if not args.quick else "lstm_results_quick.md"
    with open(os.path.join(args.out, name), "w") as f:
        f.write(report)
    print("\n" + table)
    print(f"\nwrote {os.path.join(args.out, name)} and {plot}")


def compare_fused(args, vocab=96):
    """Times one training step of the sparse model with and without the fused dW."""
    import tensorflow as tf

    from blocksparse_tf.layers import BlockSparseLSTM

    x = tf.random.normal([args.batch, args.seq_len, args.embed])
    rows = []
    for fused in (False, True):
        layer = BlockSparseLSTM(args.sparse_units, block_size=args.block_size, fused=fused,
                                layout={"generator": "watts_strogatz", "density": args.density},
                                return_sequences=True)
        layer(x)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x))
            return tape.gradient(loss, layer.trainable_weights)

        step()
        times = []
        for _ in range(3 if args.quick else 7):
            start = time.perf_counter()
            [g.numpy() for g in step()]
            times.append(time.perf_counter() - start)
        rows.append((fused, float(np.median(times))))
        print(f"fused={fused}: {rows[-1][1] * 1e3:.1f} ms per forward+backward "
              f"(batch {args.batch}, {args.seq_len} steps, {args.sparse_units} units)")
    print(f"speed-up of the fused weight gradient: {rows[0][1] / rows[1][1]:.2f}x")
    return rows


def main(argv=None):
    args = parse_args(argv)
    args.given = list(sys.argv[1:] if argv is None else argv)  # for the report's command line
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.compare_fused:
        compare_fused(args)
        return
    text = read_text(args.data, args.max_chars)
    ids, chars = encode(text)
    if held_out_chars(len(ids)) <= args.seq_len + 1:
        raise SystemExit(f"{args.data}: the held-out last 5% of its {len(ids):,} characters "
                         f"({held_out_chars(len(ids))}) must be more than --seq-len + 1 "
                         f"({args.seq_len + 1}); use a longer text or a shorter --seq-len")
    split = int(len(ids) * 0.95)
    train_ids, val_ids = ids[:split], ids[split:]
    strategy = make_strategy(args.multi_worker)
    val = ValidationCurve(*fixed_batches(val_ids, args.batch, args.seq_len, args.val_batches,
                                         args.seed + 1), args.batch)
    vocab = len(chars)
    sparse_model = build_model("sparse", args.sparse_units, vocab, args)
    dense_units = matching_dense_units(sparse_model.count_params(), vocab, args.embed)
    rows, curves, layouts_text = [], [], []
    for kind, units in (("dense", dense_units), ("sparse", args.sparse_units)):
        row, curve, model = train(kind, units, vocab, train_ids, val, args, strategy)
        rows.append(row)
        curves.append(curve)
        layouts_text.append(describe_layout(model))
    write_results(rows, curves, layouts_text, args, len(text), vocab)


if __name__ == "__main__":
    main()
