import os
import subprocess
import sys

import pytest

# Run the tests against this checkout even when the package is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Thread counts of the determinism checks: tests/test_cpu_isa.py, which runs them again under
# each narrower instruction set, takes two of them there.
THREAD_COUNTS_VARIABLE = "BLOCKSPARSE_TF_TEST_THREAD_COUNTS"


@pytest.fixture
def outputs_across_thread_counts():
    """Runs a script (argv: intra-op thread count, checkout root) in fresh processes with 1, 2
    and 3 threads (3 splits the work unevenly over this machine's cores; the counts can be set
    in THREAD_COUNTS_VARIABLE) and returns their standard outputs, for bitwise determinism
    checks: equal outputs are the same bits from different runs and splits of the work."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    counts = [int(t) for t in os.environ.get(THREAD_COUNTS_VARIABLE, "1,2,3").split(",")]

    def run(script):
        return [subprocess.run([sys.executable, "-c", script, str(threads), root],
                               capture_output=True, text=True, check=True).stdout
                for threads in counts]

    return run
