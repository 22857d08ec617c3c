"""Shared by the benchmark scripts: timing, the machine's description and docs/benchmarks.md sections."""

import gc
import os
import platform
import subprocess
import sys
import time

import tensorflow as tf

HEADER = "# Benchmarks\n\n"


# Eager ops and tf.function calls return only once their kernels have run (synchronous
# execution, TensorFlow's default, set here so a configuration cannot change it), so a timed
# call needs no host copy of its result: such a copy (0.7 ms for 1024 x 4096 floats on the
# 2-core machine of docs/benchmarks.md) costs dense and block-sparse products alike and would
# hide the difference between cheap ones.
tf.config.experimental.set_synchronous_execution(True)


def best_time(fn, repeats):
    """Fastest of `repeats` runs after a warm-up: the least disturbed by other work on the machine.

    Python's garbage collector is off while timing (as in `timeit`), so a collection that the
    benchmark's own allocations trigger does not land inside a timed call.
    """
    fn()  # warm up (and build any lazily created state)
    times = []
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        if collecting:
            gc.enable()
    return min(times)


def command_line(script, argv=None):
    """How a benchmark ran, for its report: `python benchmarks/<script> <its arguments>` (argv, or
    the process's own), without --out and its folder: where the report goes is not part of the
    measurement."""
    given = list(sys.argv[1:] if argv is None else argv)
    kept = []
    while given:
        arg = given.pop(0)
        if arg == "--out":
            given = given[1:]
        elif not arg.startswith("--out="):
            kept.append(arg)
    return " ".join(["python", f"benchmarks/{script}"] + kept)


def machine_description():
    """CPU model, SIMD level, cores, OS and TensorFlow version, in one line."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    generation = ""
    try:
        info = open("/proc/cpuinfo").read()
        simd = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "SSE"
        # Virtual machines often report a bare model name ("AMD EPYC"); the family and model
        # numbers tell the processor generation apart (AMD family 25: Zen 3/4, 26: Zen 5).
        fields = dict(line.split(":", 1) for line in info.splitlines()[:30] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "cpu family" in fields and "model" in fields:
            generation = f", family {fields['cpu family']} model {fields['model']}"
    except OSError:
        simd = "unknown SIMD"
    return (f"{cpu} ({simd}{generation}), {os.cpu_count()} cores, {platform.system()} "
            f"{platform.machine()}, TensorFlow {tf.__version__}")


HISTORY_FILE = "benchmark_history.md"


def markdown_anchor(title):
    """The anchor GitHub gives a heading: lower case, spaces as hyphens, other punctuation
    (but hyphens and underscores) dropped."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def history_link(title):
    """The line that ends each section: where its earlier tables and the measurements behind
    each change are kept (a hand-written file the scripts never touch)."""
    return (f"Earlier tables and the before/after measurements of each change: "
            f"[{HISTORY_FILE}]({HISTORY_FILE}#{markdown_anchor(title)})")


def write_section(path, title, body):
    """Puts `## title` + body (+ the history link) into the Markdown file at path, replacing
    that section if present and keeping every other section."""
    sections = {}
    order = []
    if os.path.exists(path):
        text = open(path).read()
        for chunk in text.split("\n## ")[1:]:
            name = chunk.split("\n", 1)[0].strip()
            sections[name] = "## " + chunk.strip() + "\n"
            order.append(name)
    if title not in sections:
        order.append(title)
    sections[title] = f"## {title}\n\n{body.strip()}\n\n{history_link(title)}\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(HEADER + "\n".join(sections[name] for name in order))
