#!/usr/bin/env python3
"""Side-by-side timings of the CUDA kernels' tuning variants (SetTuning) on chosen cells.

Each cell is dtype:feature_axis:N:C:bs:density:op (op fwd, dx or dw, C = K; a density written
ring0.10 makes a small-world layout of that density instead of a random one, ring0.10/0.2 one
whose connections move with probability 0.2 instead of 0.1; dx is the input
gradient dy . W^T, the forward reading w's blocks transposed on the swapped layout); each
variant's output is first checked bit for bit against the first variant's (with --close, for
variants that sum in another order: within the dtype's tolerance), then the variants are
timed in alternating rounds (medians of CUDA-event timings, L2 flushed before each run, as in
tools/gpu_check.py), and the fastest round of each is printed with its ratio to the default.

    python3 tools/gpu_variants.py --variants 0 11 12 \\
        --cells bfloat16:1:4096:4096:32:0.25:dw bfloat16:1:4096:4096:32:0.25:fwd
Needs the library built by tools/gpu_check.sh (build/libbsmm_gpu.so).  Exits non-zero if a
variant's output differs from the default's.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import (DTYPES, ROOT, TOL, Layout, Lib, Results, bench, exact_layout,  # noqa: E402
                       rel_err, same_bits)


def parse_cell(text):
    dt, fa, N, C, bs, d, op = text.split(":")
    if dt not in DTYPES or op not in ("fwd", "dx", "dw"):
        raise argparse.ArgumentTypeError(f"bad cell {text!r}")
    ring = d.startswith("ring")  # e.g. ring0.10: a rewired ring lattice, not a random layout
    rewire = float(d.split("/")[1]) if ring and "/" in d else 0.1
    density = float(d[4:].split("/")[0] if ring else d)
    return dt, int(fa), int(N), int(C), int(bs), (ring, density, rewire), op


def ring_layout(CB, KB, bs, density, rng, rewire=0.1):
    """A small-world layout as the Watts-Strogatz construction makes one: block row r
    connects to the block columns near r (a band of the given density, wrapping around), each
    connection moved to a random free column with probability `rewire`.  (Not
    blocksparse_tf.layouts.watts_strogatz, which needs networkx and scipy: the GPU tools assume
    only PyTorch and numpy.)"""
    half = max(0, int(round((density * KB - 1) / 2)))
    mask = np.zeros((CB, KB), bool)
    for r in range(CB):
        centre = r * KB // CB
        for c in range(centre - half, centre + half + 1):
            if rng.random() < rewire:
                free = np.flatnonzero(~mask[r])
                mask[r, rng.choice(free)] = True
            elif not mask[r, c % KB]:
                mask[r, c % KB] = True
    return Layout(np.argwhere(mask), CB, KB, bs)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "libbsmm_gpu.so"))
    ap.add_argument("--variants", type=int, nargs="+", default=[0])
    ap.add_argument("--cells", type=parse_cell, nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--close", action="store_true",
                    help="variants that sum in another order: check each against the default "
                         "within the dtype's tolerance (max abs difference over max abs "
                         "value) instead of bit for bit")
    ap.add_argument("--workspace", action="store_true",
                    help="pass the workspace the calls ask for, as the TensorFlow op does "
                         "(layouts of 8- to 32-wide blocks then run on their 64-wide cover where "
                         "the default's rule says so; SetTuning(28) turns that off, (29) takes "
                         "it wherever a cover exists); without it the narrow blocks' kernels "
                         "run, so that their variants are what is compared")
    ap.add_argument("--dense", action="store_true",
                    help="also time the dense product (torch.matmul, the same shapes) and print "
                         "each variant's useful throughput as a fraction of dense's: density x "
                         "dense time over the variant's time")
    args = ap.parse_args()
    lib, res = Lib(args.lib), Results()
    lib.use_workspace = args.workspace
    rng = np.random.default_rng(7)
    for dt, fa, N, C, bs, d, op in args.cells:
        tdt = DTYPES[dt][1]
        ring, d, rewire = d
        L = (ring_layout(C // bs, C // bs, bs, d, rng, rewire) if ring
             else exact_layout(C // bs, C // bs, bs, d, rng))
        x = torch.randn(*((N, C) if fa else (C, N)), device="cuda").to(tdt)
        if op == "fwd":
            b = torch.randn(L.blocks, bs, bs, device="cuda").to(tdt)
            out = torch.empty(*((N, C) if fa else (C, N)), dtype=tdt, device="cuda")
            call = lambda o: lib.forward(dt, x, b, o, N, fa, L)
        elif op == "dx":  # x plays dy (K = C here); the blocks are read transposed
            LT = L.transposed()
            b = torch.randn(L.blocks, bs, bs, device="cuda").to(tdt)
            out = torch.empty(*((N, C) if fa else (C, N)), dtype=tdt, device="cuda")
            call = lambda o: lib.forward_transposed_w(dt, x, b, o, N, fa, LT)
        else:
            b = torch.randn(*((N, C) if fa else (C, N)), device="cuda").to(tdt)
            out = torch.empty(L.blocks, bs, bs, dtype=tdt, device="cuda")
            call = lambda o: lib.grad_w(dt, x, b, o, N, fa, L)
        outs = {}
        for v in args.variants:
            lib.set_tuning(v)
            outs[v] = torch.full_like(out, float("nan"))
            rc = call(outs[v])
            torch.cuda.synchronize()
            first = outs[args.variants[0]]
            agree = (rel_err(outs[v], first.double()) <= TOL[dt] if args.close
                     else same_bits(outs[v], first))
            res.check(rc == 0 and agree,
                      f"variant {v} equals variant {args.variants[0]}: {dt} fa {fa} N {N} "
                      f"C {C} bs {bs} {d:.0%} {op}")
        best = {v: float("inf") for v in args.variants}
        for _ in range(args.rounds):
            for v in args.variants:
                lib.set_tuning(v)
                best[v] = min(best[v], bench(lambda: call(outs[v])))
        lib.set_tuning(0)
        base = best[args.variants[0]]
        cells = "  ".join(f"{v}: {best[v] * 1e3:8.1f} us (x{best[v] / base:.2f})"
                          for v in args.variants)
        cover = (f" cover fill {L.blocks / (L.cover.blocks * (64 // bs) ** 2):4.0%}"
                 if L.cover is not None else "")
        if args.dense and op != "dw":
            wd = torch.randn(C, C, device="cuda").to(tdt)
            xd = x if fa else x.t().contiguous()
            t = min(bench(lambda: torch.matmul(xd, wd)) for _ in range(args.rounds))
            density = L.blocks / (L.CB * L.KB)
            cells += f"  dense {t * 1e3:.1f} us: " + " ".join(
                f"{v}: {density * t / best[v]:.0%}" for v in args.variants)
            del wd, xd
        # x tiles per stored block that groups of four block columns read (ColumnGroupRows).
        shared = L.group_rows() / max(L.blocks, 1)
        print(f"{dt} fa {fa} N {N:5d} C=K {C} bs {bs:2d} {'ring ' if ring else ''}"
              f"{'' if rewire == 0.1 else f'/{rewire} '}{L.blocks / (L.CB * L.KB):5.1%}{cover} "
              f"x/4 {shared:.2f} {op:3s}  {cells}", flush=True)
        del x, b, out, outs
    print(f"checks: {res.passed} passed, {len(res.failed)} failed", flush=True)
    sys.exit(1 if res.failed else 0)


if __name__ == "__main__":
    main()
