import os
import subprocess
import sys

import pytest

# Run the tests against this checkout even when the package is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def outputs_across_thread_counts():
    """Runs a script (argv: intra-op thread count, checkout root) in fresh processes with 1, 2
    and 3 threads (3 splits the work unevenly over this machine's cores) and returns their
    standard outputs, for bitwise determinism checks: equal outputs are the same bits from
    different runs and different splits of the work."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(script):
        return [subprocess.run([sys.executable, "-c", script, str(threads), root],
                               capture_output=True, text=True, check=True).stdout
                for threads in (1, 2, 3)]

    return run
