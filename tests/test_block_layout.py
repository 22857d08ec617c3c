"""The 64-wide cover that the GPU op builds for layouts of narrow blocks (CoarseLayoutOf in
ops/block_layout.cc), against a brute-force cover in numpy.

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


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = tmp_path_factory.mktemp("coarse") / "coarse_layout_driver"
    subprocess.run(["g++", "-O1", "-std=c++17", "-I", ROOT,
                    os.path.join(ROOT, "ops", "block_layout.cc"),
                    os.path.join(ROOT, "tests", "coarse_layout_driver.cc"), "-o", str(exe)],
                   check=True)
    return str(exe)


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
