"""The CPU kernels of every instruction set, not only the processor's best.

The package picks AVX-512, AVX2 or baseline x86-64 kernels at run time; on an AVX-512 machine
the other two would otherwise never run here.  BLOCKSPARSE_TF_CPU_ISA selects them, and the
kernel test files run again under each in a fresh process (the choice is made once per
process)."""

import os
import subprocess
import sys

import pytest

import blocksparse_tf
from tests.conftest import THREAD_COUNTS_VARIABLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TESTS = ["tests/test_matmul.py", "tests/test_sparse_dot.py", "tests/test_conv_ops.py"]
# Out-of-memory aborts do not depend on the instruction set: left to the main run.  The
# thread-count determinism checks run under each (their processes inherit the selection), since
# each instruction set has register tiles and paths of its own.
SELECTION = "not oversized"
# The runs under another instruction set are one test each of a run that is already parallel
# (pyproject.toml): they run their tests in one process.
INNER_PYTEST_OPTIONS = ["-q", "-p", "no:cacheprovider", "-n", "0"]


def run_python(code, isa):
    env = dict(os.environ, BLOCKSPARSE_TF_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True)


def test_default_is_a_known_instruction_set():
    assert blocksparse_tf.cpu_isa() in ("amx", "avx512", "avx2", "generic")


def test_unknown_instruction_set_name_raises():
    result = run_python("import blocksparse_tf; blocksparse_tf.cpu_isa()", "avx1024")
    assert result.returncode != 0
    assert "BLOCKSPARSE_TF_CPU_ISA='avx1024' is not one of amx, avx512, avx2, generic" in result.stderr


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_kernel_tests_pass_with_narrower_instruction_sets(isa):
    if blocksparse_tf.cpu_isa() == isa:
        pytest.skip(f"{isa} is this process's instruction set: the main run tests it")
    probe = run_python("import blocksparse_tf; print(blocksparse_tf.cpu_isa())", isa)
    assert probe.returncode == 0, probe.stderr[-2000:]
    if probe.stdout.strip() != isa:
        pytest.skip(f"this processor has no {isa}")
    # The determinism checks with one thread and three (an uneven split) only, for time.
    env = dict(os.environ, BLOCKSPARSE_TF_CPU_ISA=isa, **{THREAD_COUNTS_VARIABLE: "1,3"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *INNER_PYTEST_OPTIONS, "-k", SELECTION]
        + KERNEL_TESTS, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_bfloat16_tests_pass_with_avx512_where_amx_is_the_default():
    """On a processor with AMX, bfloat16 products run on its tiles; BLOCKSPARSE_TF_CPU_ISA=
    avx512 turns them off, and the half-precision tests then check the float32 kernels'
    bfloat16 products (rounded once, bit for bit) on the same processor."""
    if blocksparse_tf.cpu_isa() != "amx":
        pytest.skip("this processor has no AMX")
    probe = run_python("import blocksparse_tf; print(blocksparse_tf.cpu_isa())", "avx512")
    assert probe.stdout.strip() == "avx512", probe.stderr[-2000:]
    env = dict(os.environ, BLOCKSPARSE_TF_CPU_ISA="avx512")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *INNER_PYTEST_OPTIONS, "-k", "half or bfloat16",
         "tests/test_matmul.py"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout.splitlines()[-1]
