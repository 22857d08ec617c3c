"""The 64-wide cover that the GPU op builds for layouts of narrow blocks (CoarseLayoutOf in
ops/block_layout.cc), against a brute-force cover in numpy; and ColumnGroupRows, which the GPU
dispatch counts the shared block rows of column groups with, against a brute-force count.

The GPU kernels run a layout of 8-, 16- or 32-wide blocks on its cover where the narrow blocks
fill enough of it; the op builds the cover on the host with CoarseLayoutOf, which runs on any
machine, so it is checked here through a small driver compiled with the package's sources (the
GPU checks in tools/gpu_check.py use a numpy mirror of it)."""

import os
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_GXX = subprocess.run(["which", "g++"], capture_output=True).returncode == 0
pytestmark = pytest.mark.skipif(not HAVE_GXX, reason="needs g++ to build the driver")


def build_driver(tmp_path_factory, name):
    """tests/NAME.cc compiled with ops/block_layout.cc; the executable's path."""
    exe = tmp_path_factory.mktemp(name) / name
    subprocess.run(["g++", "-O1", "-std=c++17", "-I", ROOT,
                    os.path.join(ROOT, "ops", "block_layout.cc"),
                    os.path.join(ROOT, "tests", name + ".cc"), "-o", str(exe)], check=True)
    return str(exe)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_driver(tmp_path_factory, "coarse_layout_driver")


def run_cases(driver, cases):
    """CoarseLayoutOf for each (coarse_bs, CB, KB, bs, coords): None where it refuses, else
    (CB, KB, bs, blocks, tables) with tables as int arrays in the driver's order."""
    text = []
    for coarse_bs, CB, KB, bs, coords in cases:
        coords = np.asarray(coords, np.int64).reshape(-1, 2)
        text.append(f"{coarse_bs} {CB} {KB} {bs} {len(coords)} "
                    + " ".join(map(str, coords.ravel())))
    out = subprocess.run([driver], input="\n".join(text) + "\n", capture_output=True,
                         text=True, check=True).stdout.split("\n")
    results, i = [], 0
    for _ in cases:
        if out[i] == "refused":
            results.append(None)
            i += 1
            continue
        assert not out[i].startswith("bad layout"), out[i]
        head = tuple(int(v) for v in out[i].split())
        tables = [np.array(out[i + 1 + t].split(), dtype=np.int64) for t in range(7)]
        results.append(head + (tables,))
        i += 8
    return results


def brute_force_cover(coords, f):
    """Row-major list of the coarse blocks any narrow block lies in."""
    return sorted({(int(c) // f, int(k) // f) for c, k in coords})


def random_case(rng, bs, coarse_bs):
    f = coarse_bs // bs
    CB, KB = f * int(rng.integers(1, 7)), f * int(rng.integers(1, 7))
    density = rng.choice([0.01, 0.05, 0.3, 0.7, 1.0])
    mask = rng.random((CB, KB)) < density
    if rng.random() < 0.3:  # an empty coarse block row and column
        r, c = int(rng.integers(CB // f)), int(rng.integers(KB // f))
        mask[r * f:(r + 1) * f, :] = False
        mask[:, c * f:(c + 1) * f] = False
    if not mask.any():  # a layout holds at least one block
        mask[int(rng.integers(CB)), int(rng.integers(KB))] = True
    coords = np.argwhere(mask)
    return coarse_bs, CB, KB, bs, coords[rng.permutation(len(coords))]  # any stored order


def test_cover_matches_brute_force(driver):
    rng = np.random.default_rng(2024)
    cases = [random_case(rng, bs, coarse_bs)
             for bs, coarse_bs in [(8, 64), (16, 64), (32, 64), (8, 32), (1, 8)]
             for _ in range(60)]
    for case, got in zip(cases, run_cases(driver, cases)):
        coarse_bs, CB, KB, bs, coords = case
        f = coarse_bs // bs
        want = brute_force_cover(coords, f)
        assert got is not None, case[:4]
        gCB, gKB, gbs, gblocks, (block_row, block_col, col_ptr, col_row, col_block, row_ptr,
                                 row_block) = got
        assert (gCB, gKB, gbs, gblocks) == (CB // f, KB // f, coarse_bs, len(want))
        # Stored in row-major order of the coarse grid.
        assert list(zip(block_row, block_col)) == want
        # The column view: each column's blocks in increasing row, pointing at their index.
        assert col_ptr[0] == 0 and col_ptr[-1] == gblocks and len(col_ptr) == gKB + 1
        for k in range(gKB):
            entries = range(col_ptr[k], col_ptr[k + 1])
            rows = [col_row[q] for q in entries]
            assert rows == sorted(r for r, c in want if c == k)
            for q in entries:
                assert (block_row[col_block[q]], block_col[col_block[q]]) == (col_row[q], k)
        assert len(row_ptr) == gCB + 1 and list(row_block) == list(range(gblocks))


def test_cover_refused_where_it_does_not_fit(driver):
    coords = [(0, 0), (3, 5)]
    cases = [(64, 6, 8, 16, coords),   # 6 block rows: not a multiple of 64 / 16
             (64, 8, 6, 16, coords),   # nor 6 block columns
             (40, 8, 8, 16, coords),   # 40 is not a multiple of 16
             (16, 8, 8, 16, coords),   # no wider than the blocks
             (8, 8, 8, 16, coords)]    # narrower
    assert run_cases(driver, cases) == [None] * len(cases)


def test_full_layout_covers_every_coarse_block(driver):
    CB, KB = 8, 12  # bs 16: a 2 x 3 grid of 64-wide blocks
    coords = np.argwhere(np.ones((CB, KB), bool))
    (got,) = run_cases(driver, [(64, CB, KB, 16, coords)])
    assert got[:4] == (2, 3, 64, 6)
    assert list(zip(got[4][0], got[4][1])) == [(r, c) for r in range(2) for c in range(3)]


# ---- ColumnGroupRows: the input tiles a product over groups of block columns reads ----

@pytest.fixture(scope="module")
def group_rows_driver(tmp_path_factory):
    return build_driver(tmp_path_factory, "column_group_rows_driver")


def column_view(mask):
    """col_ptr, col_row of a (CB, KB) mask: each column's block rows in increasing order."""
    col_ptr = np.concatenate([[0], np.cumsum(mask.sum(0))])
    col_row = np.concatenate([np.flatnonzero(mask[:, k]) for k in range(mask.shape[1])] +
                             [np.zeros(0, np.int64)])
    return col_ptr, col_row


def group_rows(driver, cases):
    """ColumnGroupRows for each (CB, KB, cols, col_ptr, col_row) as given."""
    text = [f"{CB} {KB} {len(col_row)} {cols} " + " ".join(map(str, col_ptr)) + " " +
            " ".join(map(str, col_row)) for CB, KB, cols, col_ptr, col_row in cases]
    out = subprocess.run([driver], input="\n".join(text) + "\n", capture_output=True, text=True,
                         check=True).stdout.split()
    return [int(v) for v in out]


def test_column_group_rows_match_brute_force(group_rows_driver):
    rng = np.random.default_rng(7)
    cases, want = [], []
    for _ in range(120):
        CB, KB = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        cols = int(rng.choice([1, 2, 3, 4, 8]))
        mask = rng.random((CB, KB)) < rng.choice([0.0, 0.05, 0.3, 0.9, 1.0])
        if rng.random() < 0.3:  # a band: neighbouring columns share block rows
            mask |= np.abs(np.arange(CB)[:, None] * KB // CB - np.arange(KB)[None, :]) <= 1
        mask[:, int(rng.integers(KB))] = False  # an empty column
        cases.append((CB, KB, cols) + column_view(mask))
        rows, ks = np.nonzero(mask)
        want.append(len(set(zip((ks // cols).tolist(), rows.tolist()))))
    assert group_rows(group_rows_driver, cases) == want


def test_column_group_rows_examples(group_rows_driver):
    # Columns 0-3 share rows 0 and 1; column 4, a partial last group, has row 1 again.
    mask = np.zeros((3, 5), bool)
    mask[0, [0, 1, 2, 3]] = True
    mask[1, [1, 3, 4]] = True
    cases = [(3, 5, cols) + column_view(mask) for cols in (1, 2, 4, 5)]
    assert group_rows(group_rows_driver, cases) == [7, 5, 3, 2]


def test_column_group_rows_refuses_bad_tables(group_rows_driver):
    mask = np.eye(4, dtype=bool)
    col_ptr, col_row = column_view(mask)  # 0 1 2 3 4, rows 0 1 2 3
    bad_order = col_ptr.copy()
    bad_order[1:3] = [3, 1]
    bad_row = col_row.copy()
    bad_row[2] = 4  # CB is 4
    negative_row = col_row.copy()
    negative_row[0] = -1
    bad_end = col_ptr.copy()
    bad_end[-1] = 3
    cases = [(4, 4, 2, bad_order, col_row), (4, 4, 2, col_ptr, bad_row),
             (4, 4, 2, col_ptr, negative_row), (4, 4, 0, col_ptr, col_row),
             (4, 4, 2, bad_end, col_row)]  # the bounds end before the last block
    assert group_rows(group_rows_driver, cases) == [-1, -1, -1, -1, -1]
