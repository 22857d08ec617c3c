"""CPU benchmark of sparse_dot (conditional computation) against dense tf.matmul.

For x (N, C) and a dense w (C, K), with random per-example block masks keeping fractions
a_in of the input blocks and a_out of the output blocks, it times
    forward   y  = (x * in) . w * out
    dx        dx = (dy * out) . w^T * in       (the input gradient's masked product, reading w
                                                in place with transpose_w)
    fwd+bwd   y, then dx and dw = (x * in)^T (dy * out) through tf.GradientTape, in tf.function
against the dense tf.matmul products of the same shapes, and prints speedups (dense time / ours).
The table, machine, date and command go to docs/benchmarks.md.

    python benchmarks/bench_sparse_dot.py            # 1024 x 4096 x 4096, bs 16/32/64 (a few minutes)
    python benchmarks/bench_sparse_dot.py --rounds 2 # twice over, the fastest of both counting
    python benchmarks/bench_sparse_dot.py --quick    # one block size, printed only
    python benchmarks/bench_sparse_dot.py --allocators --rounds 2
        # training steps with TensorFlow's default CPU allocator against its BFC allocator
        # (TF_CPU_ALLOCATOR_USE_BFC=true), each in its own processes, alternated

With the default allocator TensorFlow takes each tensor of 32 MiB or more (such as dw of a 4096 x
4096 layer) fresh from the operating system on every step; the BFC allocator keeps and reuses
it.  --allocators measures what that costs here and writes its own section of the report.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from blocksparse_tf import sparse_dot  # noqa: E402
from blocksparse_tf.matmul import BLOCK_SIZES  # noqa: E402
from examples.cli import positive_int, refuse_nondividing  # noqa: E402
from benchmarks.report import (best_time, command_line, machine_description,  # noqa: E402
                               write_section)

FRACTIONS = [(0.1, 0.1), (0.25, 0.25), (0.5, 0.5), (1.0, 1.0), (1.0, 0.25), (0.25, 1.0)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=positive_int, nargs=3, default=[1024, 4096, 4096],
                   metavar=("N", "C", "K"), help="every block size must divide C and K")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64], choices=BLOCK_SIZES)
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs; the fastest counts")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="passes over the whole grid (same masks and inputs each pass); the fastest "
                        "time of all passes counts, so one noisy stretch on a shared machine does not "
                        "decide a cell")
    p.add_argument("--quick", action="store_true",
                   help="bs 32 (overriding --block-sizes) and 3 mask settings; no files written")
    p.add_argument("--allocators", action="store_true",
                   help="time only the training steps, with TensorFlow's default CPU allocator and "
                        "with TF_CPU_ALLOCATOR_USE_BFC=true, in alternating processes (one pair per "
                        "round; the median of the rounds counts)")
    p.add_argument("--step-times-json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = p.parse_args(argv)
    if args.quick:
        args.block_sizes = [32]
    N, C, K = args.shape
    refuse_nondividing(p, "--block-sizes", args.block_sizes, [C, K],
                       f"C ({C}) and K ({K}) of --shape")
    return args



def training_step(product):
    """tf.function (x, w, dy) -> [y, dx, dw] of y = product(x, w) for the output gradient dy
    (y is returned so that the forward product is not pruned from the graph)."""
    @tf.function
    def step(x, w, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = product(x, w)
        return [y] + tape.gradient(y, [x, w], output_gradients=dy)
    return step


def inputs(args):
    """x, dy, w, the cases (bs, a_in, a_out) and their masks, the same in every process."""
    fractions = FRACTIONS[:3] if args.quick else FRACTIONS
    N, C, K = args.shape
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((N, C)).astype(np.float32))
    dy = tf.constant(rng.standard_normal((N, K)).astype(np.float32))
    w = tf.constant((rng.standard_normal((C, K)) / np.sqrt(C)).astype(np.float32))
    cases = [(bs, a_in, a_out) for bs in args.block_sizes for a_in, a_out in fractions]
    masks = {}
    for bs, a_in, a_out in cases:
        masks[bs, a_in, a_out] = (
            tf.constant((rng.random((N, C // bs)) < a_in).astype(np.float32)),
            tf.constant((rng.random((N, K // bs)) < a_out).astype(np.float32)))
    return x, dy, w, cases, masks


def step_times(args):
    """Fastest training-step times (seconds): {"dense": t, "bs a_in a_out": t, ...}."""
    x, dy, w, cases, masks = inputs(args)
    dense_step = training_step(tf.matmul)  # built once: a new tf.function would retrace each call
    times = {"dense": best_time(lambda: dense_step(x, w, dy), args.repeats)}
    for bs, a_in, a_out in cases:
        in_mask, out_mask = masks[bs, a_in, a_out]
        step = training_step(lambda a, b: sparse_dot(a, b, in_mask, out_mask, block_size=bs))
        times[f"{bs} {a_in} {a_out}"] = best_time(lambda: step(x, w, dy), args.repeats)
    return times


ALLOCATOR_SETTINGS = {"default": None, "BFC": "true"}


def compare_allocators(args, argv):
    """Training steps under both CPU allocators, each setting in its own process (TensorFlow
    reads TF_CPU_ALLOCATOR_USE_BFC when it starts), the order alternating between rounds."""
    child = [sys.executable, os.path.abspath(__file__), "--step-times-json", "--repeats",
             str(args.repeats), "--shape", *map(str, args.shape), "--block-sizes",
             *map(str, args.block_sizes)] + (["--quick"] if args.quick else [])
    runs = {name: [] for name in ALLOCATOR_SETTINGS}
    for round_index in range(args.rounds):
        names = list(ALLOCATOR_SETTINGS)
        for name in names if round_index % 2 == 0 else names[::-1]:
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
            env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
            if ALLOCATOR_SETTINGS[name] is not None:
                env["TF_CPU_ALLOCATOR_USE_BFC"] = ALLOCATOR_SETTINGS[name]
            run = subprocess.run(child, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"the {name} allocator's process failed:\n{run.stderr[-3000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            if result["TF_CPU_ALLOCATOR_USE_BFC"] != ALLOCATOR_SETTINGS[name]:
                raise RuntimeError(f"the {name} allocator's process saw TF_CPU_ALLOCATOR_USE_BFC="
                                   f"{result['TF_CPU_ALLOCATOR_USE_BFC']!r}")
            runs[name].append(result["times"])
            print(f"round {round_index + 1}, {name} allocator done", flush=True)
    median = {name: {key: float(np.median([r[key] for r in rs])) for key in rs[0]}
              for name, rs in runs.items()}
    rows = []
    print(f"{'case':>16} {'default ms':>11} {'BFC ms':>8} {'default / BFC':>14}")
    for key in median["default"]:
        a, b = median["default"][key] * 1e3, median["BFC"][key] * 1e3
        rows.append((key, a, b))
        print(f"{key:>16} {a:11.1f} {b:8.1f} {a / b:14.2f}")
    if args.quick:
        return rows
    N, C, K = args.shape
    lines = [
        f"- Machine: {machine_description()}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Command: `{command_line('bench_sparse_dot.py', argv)}`",
        f"- Training steps of sparse_dot (forward, then dx and dw for a given output gradient, in "
        f"`tf.function`) and of dense `tf.matmul`, x ({N}, {C}), dense w ({C}, {K}), float32, the "
        "masks of the table above; each allocator setting in its own process (TensorFlow reads "
        "`TF_CPU_ALLOCATOR_USE_BFC` when it starts), the two alternating, one pair per round; "
        f"fastest of {args.repeats} steps per process, the median over {args.rounds} round(s). "
        "With the default allocator each tensor of 32 MiB or more (glibc's largest mmap "
        "threshold), such as the 64 MiB dw, comes fresh from the operating system on every step.",
        "",
        "| bs | a_in | a_out | default allocator ms | BFC allocator ms | default / BFC |",
        "|---|---|---|---|---|---|",
    ]
    for key, a, b in rows:
        if key == "dense":
            bs, a_in, a_out = "dense `tf.matmul`", "", ""
        else:
            bs, a_in, a_out = key.split()
            a_in, a_out = f"{float(a_in):.2f}", f"{float(a_out):.2f}"
        lines.append(f"| {bs} | {a_in} | {a_out} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    write_section(os.path.join(args.out, "benchmarks.md"),
                  "CPU: sparse_dot training steps and TensorFlow's CPU allocator", "\n".join(lines))
    print(f"wrote {os.path.join(args.out, 'benchmarks.md')}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.step_times_json:  # a child of --allocators: its setting, then its times
        print(json.dumps({"TF_CPU_ALLOCATOR_USE_BFC": os.environ.get("TF_CPU_ALLOCATOR_USE_BFC"),
                          "times": step_times(args)}))
        return None
    if args.allocators:
        return compare_allocators(args, argv)
    N, C, K = args.shape
    x, dy, w, cases, masks = inputs(args)
    dense_step = training_step(lambda a, b: tf.matmul(a, b))
    fastest = {}

    def keep_fastest(key, seconds):
        fastest[key] = min(fastest.get(key, seconds), seconds)
        return fastest[key]

    rows = []
    for round_index in range(args.rounds):
        dense_fwd = keep_fastest("dense_fwd", best_time(lambda: tf.matmul(x, w), args.repeats))
        dense_bwd = keep_fastest("dense_bwd", best_time(
            lambda: tf.matmul(dy, w, transpose_b=True), args.repeats))
        dense_train = keep_fastest("dense_train", best_time(
            lambda: dense_step(x, w, dy), args.repeats))
        last = round_index + 1 == args.rounds
        if last:
            print(f"dense: forward {dense_fwd * 1e3:.1f} ms, input gradient {dense_bwd * 1e3:.1f} ms, "
                  f"forward+backward {dense_train * 1e3:.1f} ms")
            print(f"{'bs':>3} {'a_in':>5} {'a_out':>5} {'fwd ms':>8} {'fwd x':>6} {'dx x':>6} "
                  f"{'f+b ms':>8} {'f+b x':>6} {'target':>6}")
        for case in cases:
            bs, a_in, a_out = case
            in_mask, out_mask = masks[case]
            fwd = keep_fastest((case, "fwd"), best_time(
                lambda: sparse_dot(x, w, in_mask, out_mask, block_size=bs), args.repeats))
            # The input gradient is the same masked product on w^T with the masks swapped.
            bwd = keep_fastest((case, "bwd"), best_time(
                lambda: sparse_dot(dy, w, out_mask, in_mask, block_size=bs, transpose_w=True),
                args.repeats))
            step = training_step(lambda a, b: sparse_dot(a, b, in_mask, out_mask, block_size=bs))
            train = keep_fastest((case, "train"), best_time(
                lambda: step(x, w, dy), args.repeats))
            if not last:
                continue
            target = min(10.0, 0.7 / (a_in * a_out))
            row = dict(bs=bs, a_in=a_in, a_out=a_out, fwd_ms=fwd * 1e3, fwd=dense_fwd / fwd,
                       bwd=dense_bwd / bwd, train_ms=train * 1e3, train=dense_train / train,
                       target=target)
            rows.append(row)
            print(f"{bs:3d} {a_in:5.2f} {a_out:5.2f} {row['fwd_ms']:8.1f} {row['fwd']:6.2f} "
                  f"{row['bwd']:6.2f} {row['train_ms']:8.1f} {row['train']:6.2f} {target:6.2f}",
                  flush=True)
    if not args.quick:
        command = command_line("bench_sparse_dot.py", argv)
        lines = [
            f"- Machine: {machine_description()}",
            f"- Date: {datetime.date.today().isoformat()}",
            f"- Command: `{command}`",
            f"- x ({N}, {C}), dense w ({C}, {K}), float32; random per-example masks with the given "
            f"active fractions; fastest of {args.repeats} runs (synchronous calls, no host copy of "
            "the results, garbage collector off while timing)"
            f"{f' in each of {args.rounds} passes over the whole grid' if args.rounds > 1 else ''}. Speedup = dense tf.matmul time / "
            f"sparse_dot time (dense: {dense_fwd * 1e3:.1f} ms forward, {dense_train * 1e3:.1f} ms "
            "forward+backward). `dx x` is the input-gradient product alone (w read in place with "
            "`transpose_w`). Forward+backward (a training step) = forward, then dx and dw for a "
            "given output gradient through `tf.GradientTape`, both sides in `tf.function`; dw goes "
            "through `BlocksparseSparseDotGradW`, which touches only the active blocks. "
            "Target: min(10, 0.7 / (a_in a_out)).",
            "",
            "| bs | a_in | a_out | forward ms | forward x | dx x | fwd+bwd ms | fwd+bwd x | target x |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {r['bs']} | {r['a_in']:.2f} | {r['a_out']:.2f} | {r['fwd_ms']:.1f} | {r['fwd']:.2f} | "
                  f"{r['bwd']:.2f} | {r['train_ms']:.1f} | {r['train']:.2f} | {r['target']:.2f} |"
                  for r in rows]
        write_section(os.path.join(args.out, "benchmarks.md"),
                      "CPU: sparse_dot (conditional computation) against dense tf.matmul", "\n".join(lines))
        print(f"wrote {os.path.join(args.out, 'benchmarks.md')}")
    return rows


if __name__ == "__main__":
    main()
