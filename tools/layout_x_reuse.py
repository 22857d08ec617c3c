#!/usr/bin/env python3
"""How many x tiles a forward reads per stored block if a CTA computed m block columns at once.

The 16-bit GPU forwards read, for every stored block W(c, k), the x tile of block row c (the
CTA's batch rows) from the L2 into shared memory: one x tile per block, whatever the layout.
At bs 32 those reads, not the tensor cores, bound random layouts (docs/benchmarks_gpu.md).  A
CTA that computed m neighbouring block columns together could read each x tile once for all
of them: per group of m columns, as many x tiles as the block rows that any of them stores.
This prints that count over the stored blocks (1.0: no reuse) for the package's layouts, and
the share of products that would multiply a zero block if every step multiplied all m
columns (a step per block row of the group, absent blocks as a zero tile).

    python3 tools/layout_x_reuse.py                 # C = K = 4096, bs 32, density ~10%
    python3 tools/layout_x_reuse.py --features 4096 --block-size 64 --groups 1 2 4
Needs only numpy, scipy, networkx and the package's Python code (no TensorFlow, GPU or built op
library).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blocksparse_tf import layouts  # noqa: E402


def group_costs(layout, m):
    """Per stored block, when each CTA computes m consecutive block columns: the x tiles read
    (one per block row any column of the group stores) and the block products made (every
    column of the group at each such row)."""
    layout = np.asarray(layout, dtype=bool)
    reads = products = 0
    for k in range(0, layout.shape[1], m):
        group = layout[:, k:k + m]
        rows = int(group.any(axis=1).sum())
        reads += rows
        products += rows * group.shape[1]
    blocks = int(layout.sum())
    return reads / blocks, products / blocks


def layouts_of_density(n, density, seed):
    """The package's layouts of n x n blocks near `density`, by name."""
    k = max(2, 2 * round((density * n - 1) / 2))  # ring neighbours: density (k + 1) / n
    return {
        "random": layouts.random(n, n, density, seed=seed),
        f"watts_strogatz k={k} p=0.1": layouts.watts_strogatz(n, k, 0.1, seed=seed),
        f"watts_strogatz k={k} p=0.3": layouts.watts_strogatz(n, k, 0.3, seed=seed),
        f"watts_strogatz_2d k={k} p=0.1": layouts.watts_strogatz_2d(n, k, 0.1, seed=seed),
        f"barabasi_albert m={k // 2}": layouts.barabasi_albert(n, k // 2, seed=seed),
        f"banded bandwidth={k // 2}": layouts.banded(n, k // 2),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=int, default=4096, help="C = K (default 4096)")
    ap.add_argument("--block-size", type=int, default=32, help="default 32")
    ap.add_argument("--density", type=float, default=0.10, help="default 0.10")
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                    help="block columns per CTA to compare (default 1 2 4 8 16)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.features % args.block_size or args.features // args.block_size < 3:
        ap.error("--features must be a multiple of --block-size, at least 3 blocks")
    n = args.features // args.block_size
    print(f"C = K = {args.features}, bs {args.block_size} ({n} x {n} blocks), "
          f"density ~{args.density:g}, seed {args.seed}")
    print("x tiles read per stored block (zero-block share of the products) for m columns "
          "per CTA\n")
    print("| layout | density | " + " | ".join(f"m = {m}" for m in args.groups) + " |")
    print("|---|---|" + "---|" * len(args.groups))
    for name, layout in layouts_of_density(n, args.density, args.seed).items():
        layout = np.asarray(layout, dtype=bool)
        cells = []
        for m in args.groups:
            reads, products = group_costs(layout, m)
            zero_share = 1 - 1 / products
            cells.append(f"{reads:.2f} ({zero_share:.0%})")
        print(f"| {name} | {layout.mean():.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
