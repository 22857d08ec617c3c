"""The developer tools that need no GPU (tools/layout_x_reuse.py)."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import layout_x_reuse  # noqa: E402


def brute_force_group_costs(layout, m):
    """x tiles and block products per stored block, one group and block row at a time."""
    rows, cols = layout.shape
    reads = products = 0
    for start in range(0, cols, m):
        width = min(m, cols - start)
        for r in range(rows):
            if any(layout[r, start + j] for j in range(width)):
                reads += 1
                products += width
    return reads / layout.sum(), products / layout.sum()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
def test_group_costs_match_a_row_by_row_count(m):
    layout = np.random.default_rng(m).random((9, 13)) < 0.3
    layout[4, :] = False  # an empty block row
    layout[:, 5] = False  # an empty block column
    expected = brute_force_group_costs(layout, m)
    assert layout_x_reuse.group_costs(layout, m) == pytest.approx(expected, rel=1e-12)


def test_group_costs_of_known_layouts():
    # Two identical columns share every row; a diagonal shares none.
    assert layout_x_reuse.group_costs(np.ones((4, 2), bool), 2) == (0.5, 1.0)
    assert layout_x_reuse.group_costs(np.eye(4, dtype=bool), 2) == (1.0, 2.0)


def test_script_prints_a_row_per_layout():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "layout_x_reuse.py"), "--features", "256",
         "--block-size", "16", "--groups", "1", "4"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| layout | density | m = 1 | m = 4 |"
    assert len(rows) == 1 + 6
    assert all(" | 1.00 (0%) | " in row for row in rows[1:])
