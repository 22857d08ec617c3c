#!/usr/bin/env python3
"""Checks and benchmarks the CUDA sparse_dot kernels (ops/sparse_dot_gpu.*) through their C API.

Runs on a CUDA machine with PyTorch, no TensorFlow, with the library that tools/gpu_check.sh
builds (build/libbsmm_gpu.so).  Modes:
  --correctness  every dtype and block size, mask combinations, ragged shapes, transposed w,
                 unaligned pointers, many input tiles, bitwise determinism, argument checks,
                 all against float64 references with NaN-poisoned outputs.
  --check        a small subset, for compute-sanitizer memcheck.
  --race         a tensor-core subset, for compute-sanitizer racecheck.
  --bench        forward / dx / dW times against dense cuBLAS (torch.matmul) by active fraction.
  --side-by-side the 16-bit forward, dx and dW on wgmma (Hopper's default) against mma.sync
                 (SetTuning(33)).
  --pipeline-side-by-side  the wgmma products on each of their three pipelines (waiting for
                 each step's wgmma group, leaving one in flight, issuing the next copies while
                 it runs; SetTuning(37) to (40)).
Exits non-zero on any failure.
"""
import argparse
import ctypes
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import DTYPES, ROOT, TOL, Results, bench, rel_err, same_bits  # noqa: E402


class SparseDotLib:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.lib.sdot_gpu_workspace_bytes.argtypes = [I64, I64, I64]
        self.lib.sdot_gpu_workspace_bytes.restype = I64
        self.lib.sdot_gpu_forward.argtypes = [I, P, P, P, P, P, I64, I64, I64, I64, I, P, I64, P]
        self.lib.sdot_gpu_forward.restype = I
        self.lib.sdot_gpu_grad_w.argtypes = [I, P, P, P, P, P, I64, I64, I64, I64, P, I64, P]
        self.lib.sdot_gpu_grad_w.restype = I
        self.lib.bsmm_gpu_set_tuning.argtypes = [I]
        self.lib.bsmm_gpu_set_tuning.restype = None
        self._ws = None

    def set_tuning(self, variant):
        """0: the defaults; 33: the forward and dW on mma.sync where Hopper would take wgmma;
        34: the wgmma forward's grid two row tiles high, each CTA looping over several; 35: the
        defaults (once the wgmma dW's switch); 36: the wgmma dW on a grid of at most 2 x 2
        CTAs; 37: the wgmma forward with one wgmma group in flight (as the dW by default); 38:
        the wgmma dW without; 39: the wgmma dW issuing the next copies while the step's group
        runs (as the forward by default); 40: the wgmma forward waiting for each step's group
        before the next copies."""
        self.lib.bsmm_gpu_set_tuning(variant)

    def workspace(self, n, p, bs, nbytes=None):
        need = self.lib.sdot_gpu_workspace_bytes(n, p, bs) if nbytes is None else nbytes
        if self._ws is None or self._ws.numel() < need:
            self._ws = torch.empty(max(need, 1), dtype=torch.uint8, device="cuda")
        return self._ws.data_ptr(), need

    @staticmethod
    def _ptr(t):
        return t.data_ptr() if t is not None else None

    def forward(self, dt, x, w, in_m, out_m, y, n, m, p, bs, transpose_w=False, ws_bytes=None):
        ws, nb = self.workspace(n, p, bs, ws_bytes)
        return self.lib.sdot_gpu_forward(DTYPES[dt][0], self._ptr(x), self._ptr(w), self._ptr(in_m),
                                         self._ptr(out_m), self._ptr(y), n, m, p, bs,
                                         int(transpose_w), ws, nb,
                                         torch.cuda.current_stream().cuda_stream)

    def grad_w(self, dt, x, dy, in_m, out_m, dw, n, m, p, bs, ws_bytes=None):
        ws, nb = self.workspace(n, p, bs, ws_bytes)
        return self.lib.sdot_gpu_grad_w(DTYPES[dt][0], self._ptr(x), self._ptr(dy), self._ptr(in_m),
                                        self._ptr(out_m), self._ptr(dw), n, m, p, bs, ws, nb,
                                        torch.cuda.current_stream().cuda_stream)


def expand(mask, bs):
    """The mask as 0/1 over features: an entry is active where nonzero (NaN included), whatever
    its value (the op's contract; a kernel that scaled by the value would fail the checks)."""
    return (mask != 0).double().repeat_interleave(bs, dim=1)


# Values of active mask entries: not only 1, so that gating is told apart from scaling.
ACTIVE_VALUES = (1.0, 0.5, -2.0, 7.0, float("nan"))


def random_mask(n, blocks, active, gen, zero_rows=()):
    on = torch.rand(n, blocks, generator=gen, device="cuda") < active
    pick = torch.randint(len(ACTIVE_VALUES), (n, blocks), generator=gen, device="cuda")
    mask = torch.where(on, torch.tensor(ACTIVE_VALUES, device="cuda")[pick], 0.0)
    for r in zero_rows:
        if r < n:
            mask[r] = 0
    return mask


def unaligned(t):
    """A copy of t whose data starts 2 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    view = flat[1:1 + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def check_case(lib, res, dt, bs, n, m, p, a_in, a_out, gen, transpose_w=False, misalign=False,
               repeat=1, zero_rows=True, poison_inactive=False):
    """zero_rows: example 2 has no active input block and example 3 no active output block.
    poison_inactive: x is NaN in its masked-off blocks (the kernels must not read them)."""
    tdt = DTYPES[dt][1]
    x = torch.randn(n, m, generator=gen, device="cuda").to(tdt)
    w = torch.randn(m, p, generator=gen, device="cuda").to(tdt)
    dy = torch.randn(n, p, generator=gen, device="cuda").to(tdt)
    in_m = random_mask(n, m // bs, a_in, gen, zero_rows=(2,) if zero_rows else ())
    out_m = random_mask(n, p // bs, a_out, gen, zero_rows=(3,) if zero_rows else ())
    on_in = expand(in_m, bs) != 0
    if poison_inactive:
        x = torch.where(on_in, x, torch.full_like(x, float("nan")))
    wt = w.t().contiguous() if transpose_w else w
    if misalign:
        x, wt, dy = unaligned(x), unaligned(wt), unaligned(dy)
    tag = (f"{dt} bs={bs} n={n} m={m} p={p} in={a_in} out={a_out} T={int(transpose_w)} "
           f"unaligned={int(misalign)} poisoned={int(poison_inactive)}")
    xin = torch.where(on_in, x.double(), torch.zeros((), dtype=torch.float64, device="cuda"))
    ref_y = (xin @ w.double()) * expand(out_m, bs)
    ref_dw = xin.t() @ (dy.double() * expand(out_m, bs))
    outs_y, outs_dw = [], []
    for _ in range(repeat):
        y = torch.full((n, p), float("nan"), dtype=tdt, device="cuda")
        dw = torch.full((m, p), float("nan"), dtype=tdt, device="cuda")
        if misalign:
            y, dw = unaligned(y), unaligned(dw)
        rc = lib.forward(dt, x, wt, in_m, out_m, y, n, m, p, bs, transpose_w)
        rc_g = lib.grad_w(dt, x, dy, in_m, out_m, dw, n, m, p, bs)
        torch.cuda.synchronize()
        outs_y.append(y.clone())
        outs_dw.append(dw.clone())
    e = rel_err(outs_y[0], ref_y) if rc == 0 else float("inf")
    res.check(rc == 0 and e <= TOL[dt], f"sparse_dot fwd {tag} rc={rc} relerr={e:.3g}")
    e = rel_err(outs_dw[0], ref_dw) if rc_g == 0 else float("inf")
    res.check(rc_g == 0 and e <= TOL[dt], f"sparse_dot dW  {tag} rc={rc_g} relerr={e:.3g}")
    if repeat > 1:
        same = all(same_bits(o, outs_y[0]) for o in outs_y[1:])
        same_dw = all(same_bits(o, outs_dw[0]) for o in outs_dw[1:])
        res.check(same and same_dw, f"sparse_dot bitwise determinism {tag}")


# (active in, active out) of the correctness checks: all-off masks on either side included.
CHECK_FRACTIONS = [(0.5, 0.5), (1.0, 0.3), (0.3, 1.0), (1.0, 1.0), (0.0, 0.7), (0.6, 0.0)]

# m, p per block size: ragged tile columns for bs < 16, several tiles everywhere.
SHAPES = {1: (37, 45), 8: (24, 40), 16: (48, 80), 32: (96, 160), 64: (192, 128)}
# m, p multiples of 64 for the 16-bit forward on wgmma (Hopper; mma.sync elsewhere): four
# steps of 64 input features, three tile columns of 64 outputs (m != p, so that swapped strides
# fail).
WGMMA_SHAPE = (256, 192)


def wgmma_checks(lib, res, gen, quick=False):
    """The 16-bit products where Hopper runs them on wgmma (bs >= 8, m and p multiples of 64):
    the forward's tiles of 128 listed examples (a ragged last one, one example, positions past
    the listed ones, tiles with none listed, full tiles with every example listed), the dW's
    steps of 64 (the same cases: a ragged last step, one step, several, none; with the
    transposed cases m = 192, a last input tile of 64 features), every mask combination, x NaN
    where masked off, w transposed, long reductions, CTAs looping over row tiles
    (SetTuning(34)), the dW on wgmma (the default, and SetTuning(35)) and with its CTAs looping
    over input tiles and columns (36), the forward with one wgmma group in flight (37), the dW
    without (38), the dW issuing copies under its group (39), the forward waiting for each
    group (40), and the same cases on the mma.sync kernels (SetTuning(33))."""
    m, p = WGMMA_SHAPE
    # Quick: one mixed setting and the two with no active block on one side.
    fractions = [CHECK_FRACTIONS[i] for i in (0, 4, 5)] if quick else CHECK_FRACTIONS
    try:
        for tuning in (0, 34, 33, 35, 36, 37, 38, 39, 40):
            lib.set_tuning(tuning)
            for dt in (["bfloat16"] if quick else ["bfloat16", "float16"]):
                for bs in (8, 16, 32, 64):
                    for n in ((7, 300) if quick else (1, 7, 128, 130, 300)):
                        for a_in, a_out in fractions:
                            check_case(lib, res, dt, bs, n, m, p, a_in, a_out, gen,
                                       poison_inactive=True)
                    for transpose_w in (False, True):
                        check_case(lib, res, dt, bs, 256, m, p, 1.0, 1.0, gen,
                                   transpose_w=transpose_w, zero_rows=False)
                        check_case(lib, res, dt, bs, 300, p, m, 0.5, 0.5, gen,
                                   transpose_w=transpose_w, poison_inactive=True)
                if not quick:
                    check_case(lib, res, dt, 16, 1000, 4096, 128, 0.1, 0.5, gen, repeat=3)
                    check_case(lib, res, dt, 64, 777, 1024, 512, 0.4, 0.05, gen,
                               transpose_w=True, repeat=3)
                    # dW: about 19 steps a column over 8 input tiles, bs 8 (16 input mask
                    # blocks per 128-feature input tile, 8 output blocks per column).
                    check_case(lib, res, dt, 8, 1200, 1024, 192, 0.3, 0.4, gen, repeat=3,
                               poison_inactive=True)
    finally:
        lib.set_tuning(0)
    if torch.cuda.get_device_capability()[0] == 9:
        # Which kernel ran, from the example lists it left in the workspace: the wgmma forward
        # lists per 64 output features (2 counts for p = 128), the mma.sync one per 16 at bs 16
        # (8 counts); the counts come first, the lists 256 bytes on.
        x = torch.randn(256, 256, device="cuda").bfloat16()
        w = torch.randn(256, 128, device="cuda").bfloat16()
        ones_in, ones_out = torch.ones(256, 16, device="cuda"), torch.ones(256, 8, device="cuda")
        y = torch.empty(256, 128, dtype=torch.bfloat16, device="cuda")
        dy = torch.randn(256, 128, device="cuda").bfloat16()
        dw = torch.empty(256, 128, dtype=torch.bfloat16, device="cuda")
        counts, grad_counts = {}, {}
        try:
            for tuning in (0, 33, 35, 36, 37, 38, 39, 40):
                lib.set_tuning(tuning)
                lib.workspace(256, 128, 16)
                lib._ws.fill_(255)
                rc = lib.forward("bfloat16", x, w, ones_in, ones_out, y, 256, 256, 128, 16)
                torch.cuda.synchronize()
                counts[tuning] = (rc, lib._ws[:32].view(torch.int32).tolist())
                lib._ws.fill_(255)
                rc = lib.grad_w("bfloat16", x, dy, ones_in, ones_out, dw, 256, 256, 128, 16)
                torch.cuda.synchronize()
                grad_counts[tuning] = (rc, lib._ws[:32].view(torch.int32).tolist())
        finally:
            lib.set_tuning(0)
        wgmma_lists, mma_lists = (0, [256, 256] + [-1] * 6), (0, [256] * 8)
        wgmma_tunings = (0, 35, 36, 37, 38, 39, 40)
        res.check(all(counts[t] == wgmma_lists for t in wgmma_tunings) and
                  counts[33] == mma_lists,
                  f"sparse_dot forward on Hopper runs wgmma by default and under SetTuning(35) "
                  f"to (40), mma.sync under SetTuning(33) (rc and counts: {counts})")
        res.check(all(grad_counts[t] == wgmma_lists for t in wgmma_tunings) and
                  grad_counts[33] == mma_lists,
                  f"sparse_dot dW on Hopper runs wgmma by default and under SetTuning(35) to "
                  f"(40), mma.sync under SetTuning(33) (rc and counts: {grad_counts})")
        wgmma_grad_w_grids_agree(lib, res, gen)
        wgmma_overlap_agrees(lib, res, gen)


def wgmma_grad_w_grids_agree(lib, res, gen):
    """The wgmma dW bit for bit the same on its full grid (the default) and on a 2 x 2 grid
    whose CTAs loop over input tiles and columns (36): the same sums in the same order, so a
    CTA's state carried from one tile to the next would show.  m = 704: a half last input
    tile; output column 1 has no listed example, column 2 every one."""
    n, m, p = 300, 704, 256
    for dt in ("bfloat16", "float16"):
        tdt = DTYPES[dt][1]
        for bs in (8, 32, 64):
            x = torch.randn(n, m, generator=gen, device="cuda").to(tdt)
            dy = torch.randn(n, p, generator=gen, device="cuda").to(tdt)
            in_m = random_mask(n, m // bs, 0.6, gen)
            out_m = random_mask(n, p // bs, 0.5, gen)
            per_column = 64 // bs
            out_m[:, per_column:2 * per_column] = 0
            out_m[:, 2 * per_column:3 * per_column] = 1
            outs = {}
            try:
                for tuning in (35, 36):
                    lib.set_tuning(tuning)
                    dw = torch.full((m, p), float("nan"), dtype=tdt, device="cuda")
                    rc = lib.grad_w(dt, x, dy, in_m, out_m, dw, n, m, p, bs)
                    torch.cuda.synchronize()
                    outs[tuning] = (rc, dw)
            finally:
                lib.set_tuning(0)
            xin = x.double() * expand(in_m, bs)
            ref = xin.t() @ (dy.double() * expand(out_m, bs))
            (rc35, dw35), (rc36, dw36) = outs[35], outs[36]
            e = rel_err(dw35, ref) if rc35 == 0 else float("inf")
            res.check(rc35 == 0 and rc36 == 0 and e <= TOL[dt] and same_bits(dw35, dw36),
                      f"sparse_dot wgmma dW {dt} bs={bs} n={n} m={m} p={p}: full grid against "
                      f"float64 (relerr {e:.3g}) and bit for bit the 2 x 2 grid")


def wgmma_overlap_agrees(lib, res, gen):
    """The wgmma forward and dW bit for bit the same whatever the pipeline (the defaults; 37
    to 40, see SparseDotLib.set_tuning): the same wgmma groups in the same order.
    Long enough (m = 1024: 16 forward steps; n = 1100: up to 18 dW steps a column) for the
    pipelines to wrap around their stages several times."""
    n, m, p = 1100, 1024, 192
    for dt in ("bfloat16", "float16"):
        tdt = DTYPES[dt][1]
        for bs in (16, 64):
            x = torch.randn(n, m, generator=gen, device="cuda").to(tdt)
            w = torch.randn(m, p, generator=gen, device="cuda").to(tdt)
            dy = torch.randn(n, p, generator=gen, device="cuda").to(tdt)
            in_m = random_mask(n, m // bs, 0.6, gen)
            out_m = random_mask(n, p // bs, 0.7, gen)
            outs = {}
            try:
                for tuning in (0, 37, 38, 39, 40):
                    lib.set_tuning(tuning)
                    y = torch.full((n, p), float("nan"), dtype=tdt, device="cuda")
                    dw = torch.full((m, p), float("nan"), dtype=tdt, device="cuda")
                    rcs = (lib.forward(dt, x, w, in_m, out_m, y, n, m, p, bs),
                           lib.grad_w(dt, x, dy, in_m, out_m, dw, n, m, p, bs))
                    torch.cuda.synchronize()
                    outs[tuning] = (rcs, y, dw)
            finally:
                lib.set_tuning(0)
            xin = x.double() * expand(in_m, bs)
            ref_y = xin @ w.double() * expand(out_m, bs)
            ref_dw = xin.t() @ (dy.double() * expand(out_m, bs))
            _, y0, dw0 = outs[0]
            ok = all(rcs == (0, 0) for rcs, _, _ in outs.values())
            e = max(rel_err(y0, ref_y), rel_err(dw0, ref_dw)) if ok else float("inf")
            same = all(same_bits(y0, y) and same_bits(dw0, dw) for _, y, dw in outs.values())
            res.check(ok and e <= TOL[dt] and same,
                      f"sparse_dot wgmma {dt} bs={bs} n={n} m={m} p={p}: the pipelines (0, 37 to "
                      f"40) against float64 (relerr {e:.3g}) and bit for bit each other "
                      f"(rc {[outs[t][0] for t in outs]})")


def correctness(lib, res, quick=False):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(4321)
    dts = ["bfloat16", "float32"] if quick else list(DTYPES)
    ns = [7, 130] if quick else [1, 7, 64, 130]
    for dt in dts:
        for bs, (m, p) in SHAPES.items():
            for n in ns:
                for a_in, a_out in (CHECK_FRACTIONS[:2] if quick else CHECK_FRACTIONS):
                    check_case(lib, res, dt, bs, n, m, p, a_in, a_out, gen)
            check_case(lib, res, dt, bs, 33, m, p, 0.5, 0.5, gen, transpose_w=True)
            if dt != "float32" and not quick:
                check_case(lib, res, dt, bs, 33, m, p, 0.5, 0.5, gen, misalign=True)
                check_case(lib, res, dt, bs, 33, m, p, 0.5, 0.5, gen, transpose_w=True,
                           misalign=True)
    wgmma_checks(lib, res, gen, quick)
    if quick:
        return
    # Longer products: many input tiles (several mask chunks of 256 blocks at bs 1), many
    # examples.
    check_case(lib, res, "float32", 1, 3, 16 * 1100, 16, 0.5, 0.5, gen)
    check_case(lib, res, "bfloat16", 32, 1000, 1024, 512, 0.2, 0.3, gen, repeat=3)
    check_case(lib, res, "float32", 64, 777, 512, 1024, 0.4, 0.2, gen, transpose_w=True, repeat=3)
    check_case(lib, res, "float16", 16, 513, 4096, 256, 0.1, 0.5, gen, repeat=3)
    validation(lib, res)


def race_subset(lib, res):
    """Pipelines that wrap around (many steps), both products, masks narrower than a chunk."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(77)
    for bs, m, p in ((64, 512, 128), (32, 512, 64), (16, 512, 32), (8, 256, 32)):
        check_case(lib, res, "bfloat16", bs, 150, m, p, 0.7, 0.7, gen)
        check_case(lib, res, "bfloat16", bs, 150, m, p, 0.7, 0.7, gen, transpose_w=True)
    # The wgmma forward (Hopper): eight steps through its four stages; two row tiles, and five
    # on a grid two tiles high, each CTA looping over two or three (SetTuning(34)).
    check_case(lib, res, "bfloat16", 16, 200, 512, 128, 0.7, 0.7, gen)
    check_case(lib, res, "float16", 32, 200, 512, 128, 0.7, 0.7, gen, transpose_w=True)
    try:
        lib.set_tuning(34)
        check_case(lib, res, "bfloat16", 64, 600, 512, 128, 0.7, 0.7, gen)
        # The wgmma dW: about 9 steps a column through its four stages; then CTAs looping over
        # input tiles (the last one half: m = 704) and columns (36), bs 16.
        lib.set_tuning(35)
        check_case(lib, res, "bfloat16", 32, 600, 512, 128, 0.7, 0.7, gen)
        lib.set_tuning(36)
        check_case(lib, res, "float16", 16, 400, 704, 192, 0.7, 0.7, gen)
        # The forward with one wgmma group in flight (37; the dW's default: the stages
        # refilled two steps ahead), the dW without (38), the dW issuing its copies under its
        # group (39; the forward's default), the forward waiting for each group (40).
        lib.set_tuning(37)
        check_case(lib, res, "bfloat16", 16, 600, 512, 128, 0.7, 0.7, gen)
        check_case(lib, res, "float16", 64, 300, 512, 128, 0.7, 0.7, gen, transpose_w=True)
        lib.set_tuning(38)
        check_case(lib, res, "bfloat16", 32, 600, 512, 128, 0.7, 0.7, gen)
        lib.set_tuning(39)
        check_case(lib, res, "bfloat16", 64, 600, 512, 128, 0.7, 0.7, gen)
        lib.set_tuning(40)
        check_case(lib, res, "float16", 32, 600, 512, 128, 0.7, 0.7, gen, transpose_w=True)
    finally:
        lib.set_tuning(0)
    check_case(lib, res, "float32", 32, 150, 512, 64, 0.7, 0.7, gen)


def validation(lib, res):
    dt, tdt = "float32", torch.float32
    x = torch.ones(4, 32, device="cuda", dtype=tdt)
    w = torch.ones(32, 32, device="cuda", dtype=tdt)
    y = torch.zeros(4, 32, device="cuda", dtype=tdt)
    mk = torch.ones(4, 1, device="cuda")
    bad = {
        "block size 3": dict(bs=3),
        "bs not dividing m": dict(m=40),
        "negative n": dict(n=-1),
        "workspace too small": dict(ws_bytes=16),
    }
    for what, kw in bad.items():
        args = dict(n=4, m=32, p=32, bs=32)
        args.update(kw)
        ws_bytes = args.pop("ws_bytes", None)
        rc = lib.forward(dt, x, w, mk, mk, y, args["n"], args["m"], args["p"], args["bs"],
                         ws_bytes=ws_bytes)
        res.check(rc != 0, f"sparse_dot rejects {what} (rc={rc})")
    torch.cuda.synchronize()
    # Empty cases: n = 0 writes nothing; m = 0 gives zeros; dW with n = 0 gives zeros.
    y.fill_(float("nan"))
    rc = lib.forward(dt, None, None, None, mk, y, 4, 0, 32, 32)
    torch.cuda.synchronize()
    res.check(rc == 0 and bool((y == 0).all()), f"sparse_dot m=0 gives zeros (rc={rc})")
    dw = torch.full((32, 32), float("nan"), device="cuda")
    rc = lib.grad_w(dt, None, None, None, None, dw, 0, 32, 32, 32)
    torch.cuda.synchronize()
    res.check(rc == 0 and bool((dw == 0).all()), f"sparse_dot dW n=0 gives zeros (rc={rc})")


# (active in, active out) of the timing tables.
BENCH_FRACTIONS = [(1.0, 0.1), (0.1, 0.1), (0.25, 0.25), (0.5, 0.5), (1.0, 0.5), (1.0, 1.0)]


def benchmark(lib, res, out_md, quick=False):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(99)
    rows = []
    cases = [(1024, 4096, 4096), (4096, 4096, 4096)]
    for dt in (["bfloat16"] if quick else ["bfloat16", "float32"]):
        tdt = DTYPES[dt][1]
        for n, m, p in (cases[:1] if quick else cases):
            x = torch.randn(n, m, generator=gen, device="cuda").to(tdt)
            w = torch.randn(m, p, generator=gen, device="cuda").to(tdt)
            dy = torch.randn(n, p, generator=gen, device="cuda").to(tdt)
            t_dense = bench(lambda: torch.matmul(x, w))
            for bs in ([32] if quick else [16, 32, 64]):
                for a_in, a_out in BENCH_FRACTIONS:
                    in_m = random_mask(n, m // bs, a_in, gen)
                    out_m = random_mask(n, p // bs, a_out, gen)
                    nan = float("nan")  # unwritten elements fail the spot check
                    y = torch.full((n, p), nan, dtype=tdt, device="cuda")
                    dx = torch.full((n, m), nan, dtype=tdt, device="cuda")
                    dw = torch.full((m, p), nan, dtype=tdt, device="cuda")
                    # dx = (dy * out) . w^T * in: w read as stored, transposed.
                    rcs = [lib.forward(dt, x, w, in_m, out_m, y, n, m, p, bs),
                           lib.forward(dt, dy, w, out_m, in_m, dx, n, p, m, bs, True),
                           lib.grad_w(dt, x, dy, in_m, out_m, dw, n, m, p, bs)]
                    res.check(rcs == [0, 0, 0], f"bench launches {dt} n={n} bs={bs} rc={rcs}")
                    t_f = bench(lambda: lib.forward(dt, x, w, in_m, out_m, y, n, m, p, bs))
                    t_x = bench(lambda: lib.forward(dt, dy, w, out_m, in_m, dx, n, p, m, bs, True))
                    t_w = bench(lambda: lib.grad_w(dt, x, dy, in_m, out_m, dw, n, m, p, bs))
                    # Spot check of the timed outputs.
                    xm = x.double() * expand(in_m, bs)
                    dym = dy.double() * expand(out_m, bs)
                    refs = ((y, xm @ w.double() * expand(out_m, bs)),
                            (dx, dym @ w.double().t() * expand(in_m, bs)), (dw, xm.t() @ dym))
                    errs = [rel_err(out, ref) for out, ref in refs]
                    res.check(max(errs) <= TOL[dt], f"bench spot check {dt} n={n} bs={bs} "
                              f"in={a_in} out={a_out} relerr y/dx/dW "
                              + " / ".join(f"{e:.3g}" for e in errs))
                    r = dict(dt=dt, n=n, m=m, p=p, bs=bs, a_in=a_in, a_out=a_out, dense=t_dense,
                             fwd=t_f, dx=t_x, dw=t_w,
                             target=min(10.0, 0.7 / (a_in * a_out)))
                    rows.append(r)
                    print(f"{dt:8s} {n}x{m}x{p} bs={bs:2d} in={a_in:4.2f} out={a_out:4.2f} "
                          f"dense {t_dense:.4f} ms | fwd {t_f:.4f} (x{t_dense / t_f:.2f}) "
                          f"dx {t_x:.4f} (x{t_dense / t_x:.2f}) dW {t_w:.4f} (x{t_dense / t_w:.2f})"
                          f" | target x{r['target']:.1f}", flush=True)
    lines = [
        "| dtype | n x m x p | bs | active in | active out | dense ms | fwd ms | fwd x dense |"
        " dx x dense | dW x dense | fwd+dx+dW x dense | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        train = 3 * r["dense"] / (r["fwd"] + r["dx"] + r["dw"])
        lines.append(
            f"| {r['dt']} | {r['n']}x{r['m']}x{r['p']} | {r['bs']} | {r['a_in']:.0%} | "
            f"{r['a_out']:.0%} | {r['dense']:.4f} | {r['fwd']:.4f} | {r['dense'] / r['fwd']:.2f} | "
            f"{r['dense'] / r['dx']:.2f} | {r['dense'] / r['dw']:.2f} | {train:.2f} | "
            f"{r['target']:.1f} |")
    md = (f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}\n\n" + "\n".join(lines) + "\n")
    if out_md:
        with open(out_md, "w") as f:
            f.write(md)
    return md


def products_side_by_side(lib, res, tunings, what, seed):
    """The 16-bit timing grid (bfloat16; 1024 and 4096 examples x 4096 x 4096, bs 16 / 32 / 64,
    BENCH_FRACTIONS): per cell the forward, input gradient and dW under each tuning, same masks
    and inputs, checked against float64 first, then timed.  Yields (n, m, p, bs, a_in, a_out,
    dense ms, {tuning: [forward, dx, dW ms]})."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed)
    dt = "bfloat16"
    tdt = DTYPES[dt][1]
    for n, m, p in ((1024, 4096, 4096), (4096, 4096, 4096)):
        x = torch.randn(n, m, generator=gen, device="cuda").to(tdt)
        w = torch.randn(m, p, generator=gen, device="cuda").to(tdt)
        dy = torch.randn(n, p, generator=gen, device="cuda").to(tdt)
        t_dense = bench(lambda: torch.matmul(x, w))
        for bs in (16, 32, 64):
            for a_in, a_out in BENCH_FRACTIONS:
                in_m = random_mask(n, m // bs, a_in, gen)
                out_m = random_mask(n, p // bs, a_out, gen)
                outs = [torch.empty(shape, dtype=tdt, device="cuda")
                        for shape in ((n, p), (n, m), (m, p))]
                y, dx, dw = outs
                xm = x.double() * expand(in_m, bs)
                dym = dy.double() * expand(out_m, bs)
                refs = (xm @ w.double() * expand(out_m, bs),
                        dym @ w.double().t() * expand(in_m, bs), xm.t() @ dym)
                # dx = (dy * out) . w^T * in: w read as stored, transposed.
                calls = (lambda: lib.forward(dt, x, w, in_m, out_m, y, n, m, p, bs),
                         lambda: lib.forward(dt, dy, w, out_m, in_m, dx, n, p, m, bs, True),
                         lambda: lib.grad_w(dt, x, dy, in_m, out_m, dw, n, m, p, bs))
                times = {}
                try:
                    for tuning in tunings:
                        lib.set_tuning(tuning)
                        for out in outs:
                            out.fill_(float("nan"))
                        rcs = [call() for call in calls]
                        torch.cuda.synchronize()
                        errs = [rel_err(out, ref) if rcs == [0, 0, 0] else float("inf")
                                for out, ref in zip(outs, refs)]
                        res.check(max(errs) <= TOL[dt],
                                  f"{what} tuning {tuning} n={n} bs={bs} in={a_in} out={a_out} "
                                  f"rc={rcs} relerr y/dx/dW "
                                  + " / ".join(f"{e:.3g}" for e in errs))
                        times[tuning] = [bench(call) for call in calls]
                finally:
                    lib.set_tuning(0)
                yield n, m, p, bs, a_in, a_out, t_dense, times


def side_by_side(lib, res):
    """Table: the 16-bit forward, input gradient and dW on Hopper's wgmma kernels (the
    defaults) against the mma.sync kernels (SetTuning(33)), with dense cuBLAS."""
    lines = ["| dtype | n x m x p | bs | active in | active out | dense ms | fwd mma.sync ms | "
             "fwd wgmma ms | mma.sync / wgmma | dx mma.sync ms | dx wgmma ms | fwd x dense | "
             "dx x dense | dW mma.sync ms | dW wgmma ms | dW mma.sync / wgmma | dW x dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for n, m, p, bs, a_in, a_out, t_dense, times in products_side_by_side(
            lib, res, (33, 0), "side by side", 99):
        (f_old, x_old, w_old), (f_new, x_new, w_new) = times[33], times[0]
        line = (f"| bfloat16 | {n}x{m}x{p} | {bs} | {a_in:.0%} | {a_out:.0%} | "
                f"{t_dense:.4f} | {f_old:.4f} | {f_new:.4f} | {f_old / f_new:.2f} | "
                f"{x_old:.4f} | {x_new:.4f} | {t_dense / f_new:.2f} | "
                f"{t_dense / x_new:.2f} | {w_old:.4f} | {w_new:.4f} | "
                f"{w_old / w_new:.2f} | {t_dense / w_new:.2f} |")
        lines.append(line)
        print(line, flush=True)
    return "\n".join(lines) + "\n"


def pipeline_side_by_side(lib, res):
    """Table: the 16-bit wgmma products on each of their pipelines: "serial" waits for each
    step's wgmma group before issuing the next copies (the forward and dx under SetTuning(40),
    the dW under (38)); "in flight" leaves one group running while it issues them (the forward
    and dx under (37), the dW's default); "under" issues them while the step's group runs (the
    forward's and dx's default, the dW under (39))."""
    pipes = ("serial", "in flight", "under")
    lines = ["| dtype | n x m x p | bs | active in | active out | "
             + " | ".join(f"{what} {pipe} ms" for what in ("fwd", "dx", "dW") for pipe in pipes)
             + " | " + " | ".join(f"{pipe} / default (fwd, dx, dW)" for pipe in pipes) + " |",
             "|---|---|---|---|---|" + "---|" * 12]
    print("\n".join(lines), flush=True)
    # Per pipeline (serial, in flight, under): the tuning that runs the fwd, dx and dW on it.
    tunings = ((40, 40, 38), (37, 37, 0), (0, 0, 39))
    for n, m, p, bs, a_in, a_out, _, times in products_side_by_side(
            lib, res, (0, 37, 38, 39, 40), "pipeline side by side", 98):
        t = [[times[tunings[k][i]][i] for k in range(3)] for i in range(3)]
        default = times[0]  # SetTuning(0): each product on its default pipeline
        line = (f"| bfloat16 | {n}x{m}x{p} | {bs} | {a_in:.0%} | {a_out:.0%} | "
                + " | ".join(f"{v:.4f}" for row in t for v in row) + " | "
                + " | ".join(", ".join(f"{row[k] / d:.2f}" for row, d in zip(t, default))
                             for k in range(3)) + " |")
        lines.append(line)
        print(line, flush=True)
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "libbsmm_gpu.so"))
    ap.add_argument("--correctness", action="store_true")
    ap.add_argument("--check", action="store_true", help="small subset for compute-sanitizer")
    ap.add_argument("--race", action="store_true", help="tensor-core subset for racecheck")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--side-by-side", action="store_true",
                    help="16-bit forward, dx and dW: the wgmma kernels against mma.sync "
                         "(Hopper)")
    ap.add_argument("--pipeline-side-by-side", action="store_true",
                    help="16-bit wgmma forward, dx and dW on each of their three pipelines "
                         "(SetTuning(37) to (40); Hopper)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-md", default=None)
    args = ap.parse_args()
    lib = SparseDotLib(args.lib)
    res = Results()
    if args.check:
        correctness(lib, res, quick=True)
    if args.race:
        race_subset(lib, res)
    if args.correctness:
        correctness(lib, res, quick=args.quick)
    if args.bench:
        print(benchmark(lib, res, args.out_md, quick=args.quick))
    if args.side_by_side:
        try:
            side_by_side(lib, res)
        finally:
            lib.set_tuning(0)
    if args.pipeline_side_by_side:
        try:
            pipeline_side_by_side(lib, res)
        finally:
            lib.set_tuning(0)
    print(f"sparse_dot checks: {res.passed} passed, {len(res.failed)} failed", flush=True)
    if res.failed:
        print("FAILED:\n  " + "\n  ".join(res.failed[:50]))
        sys.exit(1)


if __name__ == "__main__":
    main()
