"""Shared by the benchmark scripts: timing, the machine's description and docs/benchmarks.md sections."""

import os
import platform
import subprocess
import time

import tensorflow as tf

HEADER = "# Benchmarks\n\n"


def best_time(fn, repeats):
    """Fastest of `repeats` runs after a warm-up: the least disturbed by other work on the machine."""
    fn()  # warm up (and build any lazily created state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_description():
    """CPU model, SIMD level, cores, OS and TensorFlow version, in one line."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        flags = open("/proc/cpuinfo").read()
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    except OSError:
        simd = "unknown SIMD"
    return (f"{cpu} ({simd}), {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
            f"TensorFlow {tf.__version__}")


def write_section(path, title, body):
    """Puts `## title` + body into the Markdown file at path, replacing that section if present
    and keeping every other section."""
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
    sections[title] = f"## {title}\n\n{body.strip()}\n"
    with open(path, "w") as f:
        f.write(HEADER + "\n".join(sections[name] for name in order))
