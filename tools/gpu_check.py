#!/usr/bin/env python3
"""Checks and benchmarks the CUDA block-sparse kernels through their C API (ctypes + PyTorch).

Needs a CUDA GPU, PyTorch, and the library built by tools/gpu_check.sh (build/libbsmm_gpu.so).
No TensorFlow.  Modes:
  --correctness   every block size, dtype, feature axis, ragged N, empty rows/columns, against
                  float64 references; run-to-run bitwise determinism; argument validation.
  --check         a small subset, meant to run under compute-sanitizer.
  --transposed    only the transposed-batch checks (with --check / --race: their sanitizer
                  subsets), e.g. under racecheck without the whole --race subset.
  --bench         timing table against dense cuBLAS (torch.matmul) and PyTorch BSR.
  --bench-transpose  timing of the forward reading w's blocks transposed (the input gradient).
Exits non-zero on any failure.
"""
import argparse
import ctypes
import datetime
import itertools
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"float32": (0, torch.float32), "float16": (1, torch.float16),
          "bfloat16": (2, torch.bfloat16)}
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


# ----------------------------------------------------------------------------------------------
# Bytes after a poisoned workspace (Lib.poison_workspace) that no call may write.
WORKSPACE_GUARD = 256


class Lib:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        # dtype, a, b, out, N, feature axis, layout tables, CB, KB, bs, blocks, cover tables,
        # cover blocks, workspace, workspace bytes, stream
        sig = [I, P, P, P, I64, I, P, I64, I64, I64, I64, P, I64, P, I64, P]
        for name in ("bsmm_gpu_forward", "bsmm_gpu_grad_w"):
            f = getattr(self.lib, name)
            f.argtypes = sig
            f.restype = I
        self.lib.bsmm_gpu_error_string.argtypes = [I]
        self.lib.bsmm_gpu_error_string.restype = ctypes.c_char_p
        self.lib.bsmm_gpu_selected_path.argtypes = [I, I64, I, I64, I]
        self.lib.bsmm_gpu_selected_path.restype = I
        self.lib.bsmm_gpu_forward_transposed_w.argtypes = sig
        self.lib.bsmm_gpu_forward_transposed_w.restype = I
        self.lib.bsmm_gpu_set_tuning.argtypes = [I]
        self.lib.bsmm_gpu_set_tuning.restype = None
        self.lib.bsmm_gpu_workspace_bytes.argtypes = [I, I64, I, P, I64, I64, I64, I64, P, I64,
                                                      I]
        self.lib.bsmm_gpu_workspace_bytes.restype = I64
        self.tuning = 0
        # Whether every call passes the workspace it asks for, as the TensorFlow op does (one
        # buffer, grown as needed; the calls run on one stream): on for the benchmark and the
        # checks of layouts run as 64-wide blocks (full_layout_checks); off for the other
        # checks, so that they keep testing the kernels of the narrow blocks.
        self.use_workspace = False
        # Fill the workspace with NaN bytes before each call (checks: the cover's blocks
        # without narrow blocks must be written as zeros by the call itself), allocated at the
        # size the call asks for with a guard after it that the call must not touch.
        self.poison_workspace = False
        self._workspace = None

    def set_tuning(self, v):
        self.lib.bsmm_gpu_set_tuning(v)
        self.tuning = v

    def workspace_bytes(self, dt, N, fa, L, grad_w):
        return self.lib.bsmm_gpu_workspace_bytes(DTYPES[dt][0], N, fa, *L.args(), int(grad_w))

    def _workspace_for(self, dt, N, fa, L, grad_w):
        if not self.use_workspace:
            return None, 0
        nbytes = self.workspace_bytes(dt, N, fa, L, grad_w)
        if nbytes == 0:
            return None, 0
        if self.poison_workspace:
            # Exactly the bytes asked for, as the TensorFlow op allocates them, and a guard
            # after them that the call must leave as it is (see _call).
            self._workspace = None
            self._workspace = torch.full((nbytes + WORKSPACE_GUARD,), 255, dtype=torch.uint8,
                                         device="cuda")
            torch.cuda.synchronize()  # filled before a call on another stream reads it
            return self._workspace.data_ptr(), nbytes
        if self._workspace is None or self._workspace.numel() < nbytes:
            self._workspace = None
            self._workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        return self._workspace.data_ptr(), nbytes

    def _call(self, f, dt, a, b, out, N, fa, L, stream=None, raw_ptrs=None, grad_w=False):
        s = torch.cuda.current_stream().cuda_stream if stream is None else stream
        ptrs = raw_ptrs or (a.data_ptr() if a is not None else None,
                            b.data_ptr() if b is not None else None,
                            out.data_ptr() if out is not None else None)
        ws, ws_bytes = self._workspace_for(dt, N, fa, L, grad_w)
        rc = f(DTYPES[dt][0], ptrs[0], ptrs[1], ptrs[2], N, fa, *L.args(), ws, ws_bytes, s)
        if ws is not None and self.poison_workspace:
            torch.cuda.synchronize()  # the call may run on another stream
            if not bool((self._workspace[ws_bytes:] == 255).all()):
                raise RuntimeError(f"a call wrote past the {ws_bytes} workspace bytes it asked for")
        return rc

    def forward(self, dt, x, w, y, N, fa, L, **kw):
        return self._call(self.lib.bsmm_gpu_forward, dt, x, w, y, N, fa, L, **kw)

    def grad_w(self, dt, x, dy, dw, N, fa, L, **kw):
        return self._call(self.lib.bsmm_gpu_grad_w, dt, x, dy, dw, N, fa, L, grad_w=True,
                          **kw)

    def forward_transposed_w(self, dt, x, w, y, N, fa, L, **kw):
        """y = x . W where w holds the transposes of the blocks of L (the product's layout)."""
        return self._call(self.lib.bsmm_gpu_forward_transposed_w, dt, x, w, y, N, fa, L, **kw)

    def err(self, code):
        return self.lib.bsmm_gpu_error_string(code).decode()

    def path(self, dt, N, fa, bs, gw):
        return self.lib.bsmm_gpu_selected_path(DTYPES[dt][0], N, fa, bs, int(gw))


class Layout:
    """Python mirror of ops/block_layout.cc: block list plus its column view, on the GPU; for
    8-, 16- and 32-wide blocks whose grid 64-wide blocks divide, also its 64-wide cover
    (CoarseLayoutOf) in `cover`, which the TensorFlow op passes with every layout."""

    def __init__(self, coords, CB, KB, bs, cover=True, host_col_ptr=True):
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.CB, self.KB, self.bs, self.blocks = CB, KB, bs, len(coords)
        self.block_row = coords[:, 0].astype(np.int32)
        self.block_col = coords[:, 1].astype(np.int32)
        order = np.lexsort((self.block_row, self.block_col))  # by column, then row
        counts = np.bincount(self.block_col, minlength=KB)
        self.col_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        self.col_row = self.block_row[order].astype(np.int32)
        self.col_block = order.astype(np.int32)
        dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()
        self.d = [dev(a) for a in (self.col_ptr, self.col_row, self.col_block, self.block_row,
                                   self.block_col)]
        # The sixth and seventh pointers: the host copies of col_ptr and col_row, as the
        # TensorFlow op passes them (or nulls).
        self.table_array = (ctypes.c_void_p * 7)(
            *[t.data_ptr() for t in self.d],
            self.col_ptr.ctypes.data if host_col_ptr else None,
            self.col_row.ctypes.data if host_col_ptr else None)
        self.cover = None
        f = 64 // bs if bs in (8, 16, 32) else 0
        if cover and f and CB % f == 0 and KB % f == 0:
            keys = np.unique(self.block_row.astype(np.int64) // f * (KB // f) +
                             self.block_col // f)  # row-major on the cover's grid
            self.cover = Layout(np.stack([keys // (KB // f), keys % (KB // f)], 1), CB // f,
                                KB // f, 64, cover=False)

    def args(self):
        """The shim's layout arguments: tables, CB, KB, bs, blocks, cover tables, cover blocks."""
        c = self.cover
        return (ctypes.cast(self.table_array, ctypes.c_void_p), self.CB, self.KB, self.bs,
                self.blocks, ctypes.cast(c.table_array, ctypes.c_void_p) if c else None,
                c.blocks if c else -1)

    def transposed(self):
        return Layout(np.stack([self.block_col, self.block_row], 1), self.KB, self.CB, self.bs)

    def mask(self):
        """(CB, KB) booleans: which blocks are stored."""
        m = np.zeros((self.CB, self.KB), bool)
        m[self.block_row, self.block_col] = True
        return m

    def group_rows(self, cols=4):
        """The block rows holding a block in each group of `cols` neighbouring block columns,
        summed over the groups: the x tiles the grouped forward reads (ColumnGroupRows in
        ops/block_layout.h)."""
        return len(set(zip((self.block_col // cols).tolist(), self.block_row.tolist())))

    def dense(self, w):
        """Densified W (C, K) from blocks w (blocks, bs, bs), in w's dtype and device."""
        bs = self.bs
        Wb = torch.zeros(self.CB, self.KB, bs, bs, dtype=w.dtype, device=w.device)
        Wb[torch.from_numpy(self.block_row).long().to(w.device),
           torch.from_numpy(self.block_col).long().to(w.device)] = w
        return Wb.permute(0, 2, 1, 3).reshape(self.CB * bs, self.KB * bs)

    def gather(self, G):
        """Blocks (blocks, bs, bs) of a dense (C, K) matrix at this layout's positions."""
        bs = self.bs
        Gb = G.reshape(self.CB, bs, self.KB, bs).permute(0, 2, 1, 3)
        return Gb[torch.from_numpy(self.block_row).long().to(G.device),
                  torch.from_numpy(self.block_col).long().to(G.device)]


def random_layout(CB, KB, bs, density, rng, empty_rows=(), empty_cols=()):
    mask = rng.random((CB, KB)) < density
    for r in empty_rows:
        mask[r, :] = False
    for c in empty_cols:
        mask[:, c] = False
    if not mask.any():
        mask[0 if 0 not in empty_rows else CB - 1, 0 if 0 not in empty_cols else KB - 1] = True
    coords = np.argwhere(mask)
    coords = coords[rng.permutation(len(coords))]  # stored block order is arbitrary
    return Layout(coords, CB, KB, bs)


def exact_layout(CB, KB, bs, density, rng):
    nb = max(1, int(round(density * CB * KB)))
    flat = np.sort(rng.choice(CB * KB, size=nb, replace=False))
    return Layout(np.stack([flat // KB, flat % KB], 1), CB, KB, bs)


def same_bits(a, b):
    """Whether two tensors of one element type hold the same bits, element for element."""
    kind = torch.int16 if a.element_size() == 2 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(kind), b.reshape(-1).view(kind))


def rel_err(out, ref):
    out = out.double()
    if out.numel() == 0:
        return 0.0 if ref.numel() == 0 else float("inf")
    if torch.isnan(out).any() or torch.isinf(out).any():
        return float("inf")
    den = ref.abs().max().item()
    num = (out - ref).abs().max().item()
    return num / den if den > 0 else num


# ----------------------------------------------------------------------------------------------
class Results:
    """Counts checks; with GPU_CHECK_VERBOSE=1 prints each passing one with its time (to see how
    far a run under compute-sanitizer got)."""

    def __init__(self):
        self.passed = 0
        self.failed = []
        self.verbose = os.environ.get("GPU_CHECK_VERBOSE") == "1"
        self.t0 = time.time()

    def check(self, ok, what):
        if ok:
            self.passed += 1
            if self.verbose:
                print(f"ok {time.time() - self.t0:7.1f}s {what}", flush=True)
        else:
            self.failed.append(what)
            print("FAIL:", what, flush=True)


def run_case(lib, res, dt, bs, L, N, fa, gen, ops=("fwd", "dw")):
    tdt = DTYPES[dt][1]
    C, K = L.CB * bs, L.KB * bs
    dev = "cuda"
    w = torch.randn(L.blocks, bs, bs, generator=gen, device=dev).to(tdt)
    W64 = L.dense(w).double()
    xs = (N, C) if fa == 1 else (C, N)
    ys = (N, K) if fa == 1 else (K, N)
    x = torch.randn(*xs, generator=gen, device=dev).to(tdt)
    tag = f"{dt} bs={bs} CB={L.CB} KB={L.KB} blocks={L.blocks} N={N} fa={fa}"
    if "fwd" in ops:
        y = torch.full(ys, float("nan"), dtype=tdt, device=dev)
        rc = lib.forward(dt, x, w, y, N, fa, L)
        torch.cuda.synchronize()
        ref = x.double() @ W64 if fa == 1 else W64.t() @ x.double()
        e = rel_err(y, ref) if rc == 0 else float("inf")
        res.check(rc == 0 and e <= TOL[dt],
                  f"forward {tag} rc={rc} relerr={e:.3g} path={lib.path(dt, N, fa, bs, 0)}")
    if "dw" in ops:
        dy = torch.randn(*ys, generator=gen, device=dev).to(tdt)
        dw = torch.full((L.blocks, bs, bs), float("nan"), dtype=tdt, device=dev)
        rc = lib.grad_w(dt, x, dy, dw, N, fa, L)
        torch.cuda.synchronize()
        G = x.double().t() @ dy.double() if fa == 1 else x.double() @ dy.double().t()
        ref = L.gather(G)
        e = rel_err(dw, ref) if rc == 0 else float("inf")
        res.check(rc == 0 and e <= TOL[dt],
                  f"grad_w  {tag} rc={rc} relerr={e:.3g} path={lib.path(dt, N, fa, bs, 1)}")
    if "dx" in ops:
        # dx = dy . W^T as the TensorFlow op computes it (transpose_w): the forward on the
        # swapped layout, reading w's blocks transposed as stored.
        dy = torch.randn(*ys, generator=gen, device=dev).to(tdt)
        LT = L.transposed()
        dx = torch.full(xs, float("nan"), dtype=tdt, device=dev)
        rc = lib.forward_transposed_w(dt, dy, w, dx, N, fa, LT)
        torch.cuda.synchronize()
        ref = dy.double() @ W64.t() if fa == 1 else W64 @ dy.double()
        e = rel_err(dx, ref) if rc == 0 else float("inf")
        res.check(rc == 0 and e <= TOL[dt], f"dx      {tag} rc={rc} relerr={e:.3g}")
        # Bit for bit the forward on a transposed copy of the blocks (PyTorch's).
        dx_copy = torch.full_like(dx, float("nan"))
        rc = lib.forward(dt, dy, w.transpose(1, 2).contiguous(), dx_copy, N, fa, LT)
        torch.cuda.synchronize()
        res.check(rc == 0 and same_bits(dx, dx_copy),
                  f"dx reading w transposed = forward on a copy {tag} rc={rc}")


def empty_layout_checks(lib, res, quick):
    """A layout without blocks (w may then be null, as TensorFlow passes an empty tensor's): the
    forward writes zeros over every output, whatever path the batch size picks; the weight
    gradient has nothing to write and leaves its (empty) output alone."""
    for dt, bs, fa, N in itertools.product(DTYPES, [1, 16, 64] if quick else [1, 8, 16, 32, 64],
                                           (1, 0), [17, 64] if quick else [1, 17, 64, 1000]):
        tdt = DTYPES[dt][1]
        L = Layout(np.zeros((0, 2), np.int64), 3, 5, bs)
        C, K = L.CB * bs, L.KB * bs
        x = torch.randn(*((N, C) if fa else (C, N)), device="cuda").to(tdt)
        y = torch.full((N, K) if fa else (K, N), float("nan"), dtype=tdt, device="cuda")
        rc = lib.forward(dt, x, None, y, N, fa, L, raw_ptrs=(x.data_ptr(), None, y.data_ptr()))
        torch.cuda.synchronize()
        res.check(rc == 0 and bool((y == 0).all()),
                  f"empty layout: forward writes zeros {dt} bs={bs} fa={fa} N={N} rc={rc}")
        dy = torch.randn(*((N, K) if fa else (K, N)), device="cuda").to(tdt)
        rc = lib.grad_w(dt, x, dy, None, N, fa, L, raw_ptrs=(x.data_ptr(), dy.data_ptr(), None))
        torch.cuda.synchronize()
        res.check(rc == 0, f"empty layout: grad_w does nothing {dt} bs={bs} fa={fa} N={N} rc={rc}")


def forwards_under(lib, dt, x, w, N, fa, runs):
    """The forward of x and w with layout L under SetTuning(t), for each (L, t) of `runs`, into
    NaN-filled outputs: [(rc, y)], each waited for; the tuning is set back as it was."""
    before = lib.tuning
    outs = []
    for L, tuning in runs:
        lib.set_tuning(tuning)
        K = L.KB * L.bs
        y = torch.full((N, K) if fa else (K, N), float("nan"), dtype=x.dtype, device="cuda")
        outs.append((lib.forward(dt, x, w, y, N, fa, L), y))
        torch.cuda.synchronize()
    lib.set_tuning(before)
    return outs


def smaller_shared_memory_checks(lib, res, gen, rng):
    """SetTuning(19) runs as a compute capability 8.6 GPU (99 KiB of shared memory per CTA):
    the bs-64 mma.sync forwards whose tiles need 104-108 KiB take one pipeline stage fewer (else
    their launch fails).  Against the float64 reference, and bit for bit against the same tiles
    at full depth (SetTuning(3)) where there are tiles enough that neither splits one over a
    cluster."""
    L = random_layout(40, 32, 64, 0.3, rng, empty_cols=[5])
    for dt, fa in itertools.product(DTYPES, (1, 0)):
        tdt = DTYPES[dt][1]
        lib.set_tuning(19)
        for N in (64, 136, 2048):  # small-batch, long-batch and (float32) 128-row tiles
            run_case(lib, res, dt, 64, L, N, fa, gen, ops=("fwd", "dx"))
        N = 1000  # below the float32 bs-64 128-row tiles, which need 104 KiB at two stages
        x = torch.randn(*((N, L.CB * 64) if fa else (L.CB * 64, N)), generator=gen,
                        device="cuda").to(tdt)
        w = torch.randn(L.blocks, 64, 64, generator=gen, device="cuda").to(tdt)
        outs = forwards_under(lib, dt, x, w, N, fa, [(L, 19), (L, 3)])
        res.check(all(rc == 0 for rc, _ in outs) and same_bits(outs[0][1], outs[1][1]),
                  f"99 KiB of shared memory: the bs-64 forward with fewer stages equals full "
                  f"depth bitwise, {dt} fa={fa} N={N} rc={[rc for rc, _ in outs]}")
    lib.set_tuning(0)


def bs64_narrow_checks(lib, res, gen, rng, quick):
    """The 16-bit bs-64 forward from 512 rows runs the narrow wgmma kernel (Hopper): 128-row
    tiles of 3 stages for columns of at most 6 blocks, else 192-row tiles of 3 from 4096 rows
    and 128-row tiles of 4 below.  Forward and dx against float64 (ragged last tiles: 520 and
    4104 rows), and bit for bit between those configurations (SetTuning(21), (22)) and the
    cp.async copies (SetTuning(6)); the transposed kernel they replace (SetTuning(20)) against
    float64 at 1000 rows."""
    if not is_hopper() or lib.tuning != 0:
        return
    layouts = [random_layout(24, 5, 64, 0.5, rng, empty_cols=[2]),    # ~12 blocks per column
               random_layout(24, 5, 64, 0.15, rng, empty_cols=[3])]   # ~4
    Ns = [520] if quick else [520, 1000, 4104]
    for dt in (["bfloat16"] if quick else ["bfloat16", "float16"]):
        tdt = DTYPES[dt][1]
        for L, N, fa in itertools.product(layouts, Ns, (1, 0)):
            run_case(lib, res, dt, 64, L, N, fa, gen, ops=("fwd", "dx"))
            x = torch.randn(*((N, L.CB * 64) if fa else (L.CB * 64, N)), generator=gen,
                            device="cuda").to(tdt)
            w = torch.randn(L.blocks, 64, 64, generator=gen, device="cuda").to(tdt)
            tunings = [0, 6] if quick else [0, 21, 22, 6]
            outs = forwards_under(lib, dt, x, w, N, fa, [(L, t) for t in tunings])
            res.check(all(rc == 0 and same_bits(y, outs[0][1]) for rc, y in outs),
                      f"bs-64 narrow forward: tunings {tunings} equal bit for bit, {dt} fa={fa} "
                      f"N={N} blocks={L.blocks} rc={[rc for rc, _ in outs]}")
    if not quick:
        lib.set_tuning(20)
        for L, fa in itertools.product(layouts, (1, 0)):
            run_case(lib, res, "bfloat16", 64, L, 1000, fa, gen, ops=("fwd", "dx"))
        lib.set_tuning(0)


def run_start_checks(lib, res, gen, rng, quick):
    """The 16-bit small-batch forward (Hopper, N <= 64) takes its CTAs' runs of the column lists
    from the launch's parameters where the layout comes with col_ptr's host copy (Layout's
    sixth table; the TensorFlow op passes it; SetTuning(43) turns it off): forward and dx
    against float64 with it on and off, and bit for bit against reading col_ptr from device
    memory (SetTuning(43), and a layout without the host copy), and for bs 64 against the
    copy-engine configurations of one and four blocks per step (SetTuning(41), (42)).  Layouts:
    clusters of two (long columns), empty columns, a grid wider than the parameters hold (520
    columns), and a host copy whose inner bounds disagree with the device's (the launch must
    then ignore it); a host copy whose ends disagree is refused."""
    if not is_hopper() or lib.tuning != 0:
        return
    cases = [(64, random_layout(80, 5, 64, 0.9, rng, empty_cols=[2])),   # split: ~72 blocks
             (32, random_layout(90, 4, 32, 0.95, rng, empty_cols=[1])),  # split 4-block steps
             (32, random_layout(30, 7, 32, 0.5, rng, empty_cols=[0, 6])),
             (16, random_layout(40, 6, 16, 0.7, rng, empty_cols=[5]))]
    if not quick:
        cases.append((32, random_layout(3, 520, 32, 0.6, rng, empty_cols=[7])))
    Ns = [64, 40] if quick else [64, 40, 16]
    for dt in (["bfloat16"] if quick else ["bfloat16", "float16"]):
        tdt = DTYPES[dt][1]
        for (bs, L), N, fa in itertools.product(cases, Ns, (1, 0)):
            for tuning in (0, 43):
                lib.set_tuning(tuning)
                run_case(lib, res, dt, bs, L, N, fa, gen, ops=("fwd", "dx"))
            lib.set_tuning(0)
            bare = Layout(np.stack([L.block_row, L.block_col], 1), L.CB, L.KB, bs,
                          host_col_ptr=False)
            x = torch.randn(*((N, L.CB * bs) if fa else (L.CB * bs, N)), generator=gen,
                            device="cuda").to(tdt)
            w = torch.randn(L.blocks, bs, bs, generator=gen, device="cuda").to(tdt)
            variants = [(L, 0), (L, 43), (bare, 0)]
            if bs == 64:  # the other copy-engine step sizes: one block, four
                variants += [(L, 41), (L, 42)]
            outs = forwards_under(lib, dt, x, w, N, fa, variants)
            res.check(all(rc == 0 and same_bits(y, outs[0][1]) for rc, y in outs),
                      f"small-batch forward: run starts from the host = from col_ptr (and other "
                      f"bs-64 steps), bit for bit, {dt} bs={bs} KB={L.KB} blocks={L.blocks} "
                      f"N={N} fa={fa} rc={[rc for rc, _ in outs]}")
    # Host copies that disagree with the device's col_ptr: inside (ignored), or at an end
    # (refused with cudaErrorInvalidValue before anything runs).
    bs, L = cases[0]
    N, dt = 64, "bfloat16"
    x = torch.randn(N, L.CB * bs, generator=gen, device="cuda").to(torch.bfloat16)
    w = torch.randn(L.blocks, bs, bs, generator=gen, device="cuda").to(torch.bfloat16)
    y0 = torch.full((N, L.KB * bs), float("nan"), dtype=torch.bfloat16, device="cuda")
    rc0 = lib.forward(dt, x, w, y0, N, 1, L)
    torch.cuda.synchronize()
    good = L.col_ptr.copy()
    try:
        L.col_ptr[1:-1] = L.col_ptr[1:-1][::-1]  # decreasing inner bounds
        y = torch.full_like(y0, float("nan"))
        rc = lib.forward(dt, x, w, y, N, 1, L)
        torch.cuda.synchronize()
        res.check(rc0 == 0 and rc == 0 and same_bits(y, y0),
                  f"small-batch forward ignores a host col_ptr with bad inner bounds rc={rc}")
        L.col_ptr[:] = good
        L.col_ptr[-1] += 1
        rc = lib.forward(dt, x, w, y, N, 1, L)
        torch.cuda.synchronize()
        res.check(rc == 1, f"forward refuses a host col_ptr whose last bound is not the block "
                           f"count: rc={rc} ({lib.err(rc)})")
    finally:
        L.col_ptr[:] = good


def grouped_checks(lib, res, gen, rng, quick):
    """The 16-bit bs-32 forward over groups of 4 or 2 block columns (Hopper, feature axis 1,
    N > 64; SetTuning(44) / (45) take it wherever it can run): forward and dx against float64
    and dx bit for bit against the forward on transposed copies (run_case); bit for bit from run
    to run, with the list bounds read from col_ptr (no host copies) instead of the launch's
    parameters, and against the narrow kernel (SetTuning(46)); and an infinity in x reaching,
    as NaN, the group's columns without a block in its block row (the zero blocks' products,
    as documented), which also shows that this kernel ran.  Layouts: a block-column count that
    leaves a partial last group, long columns (the copy warp loads its windows of each list
    ahead), a group of empty columns, a banded layout (the small-world case the kernel is for).
    And the default's choice between it and the narrow kernel (SetTuning(46) never takes it),
    seen by where the infinity's NaNs go.  Part of --correctness (and of --check); --grouped
    runs these alone."""
    if not is_hopper() or lib.tuning != 0:
        return
    # A ring: block row r holds block columns r - 2 .. r + 2 (mod 24); the banded layout adds
    # about 5% of random blocks to it.
    offset = np.subtract.outer(np.arange(24), np.arange(24)) % 24
    ring = np.argwhere(np.minimum(offset, 24 - offset) <= 2)
    ring1 = np.argwhere(np.minimum(offset, 24 - offset) <= 1)  # 0.5 x tiles per block
    band = np.argwhere((np.minimum(offset, 24 - offset) <= 2) | (rng.random((24, 24)) < 0.05))
    layouts = [random_layout(20, 9, 32, 0.65, rng, empty_cols=[4]),
               random_layout(6, 10, 32, 0.4, rng, empty_rows=[1], empty_cols=[0, 1, 2, 3]),
               Layout(band, 24, 24, 32)]
    if not quick:
        layouts.append(random_layout(40, 5, 32, 0.85, rng, empty_cols=[3]))
    for (tuning, L), N, dt in itertools.product(
            itertools.product((44, 45), layouts), [130] if quick else [65, 130, 1000],
            ["bfloat16"] if quick else ["bfloat16", "float16"]):
        lib.set_tuning(tuning)
        run_case(lib, res, dt, 32, L, N, 1, gen, ops=("fwd", "dx"))
        lib.set_tuning(0)
        tdt = DTYPES[dt][1]
        x = torch.randn(N, L.CB * 32, generator=gen, device="cuda").to(tdt)
        w = torch.randn(L.blocks, 32, 32, generator=gen, device="cuda").to(tdt)
        bare = Layout(np.stack([L.block_row, L.block_col], 1), L.CB, L.KB, 32,
                      host_col_ptr=False)
        outs = forwards_under(lib, dt, x, w, N, 1,
                              [(L, tuning), (L, tuning), (bare, tuning), (L, 46)])
        res.check(all(rc == 0 for rc, _ in outs) and
                  all(same_bits(outs[0][1], y) for _, y in outs[1:]),
                  f"grouped forward run to run, without host copies and as the narrow kernel "
                  f"(SetTuning(46)), bit for bit, {dt} tuning={tuning} KB={L.KB} "
                  f"blocks={L.blocks} N={N}")
    # An infinity in x[7, r-block]: in y's row 7, infinite where a column has a block in block
    # row r, NaN (infinity times a zero block) in the other columns of those columns' groups,
    # finite elsewhere; the other rows of y finite.
    L = layouts[0]
    r = int(np.flatnonzero(L.mask()[:, 5])[0])  # column 4 (empty) shares 5's group
    for tuning, cols in ((44, 4), (45, 2)):
        ok, groups = infinity_reaches_groups(lib, gen, L, 130, tuning, r, cols)
        res.check(ok, f"grouped forward: an infinity in x is NaN in its groups' columns "
                      f"tuning={tuning} row={r} groups={groups}")
    # The default: groups of four where they read at most 0.42 x tiles per stored block
    # (counted here from the mask), from 1000 rows (kGroupedMaxRowsPerBlock, kGroupedMinBatch
    # in ops/blocksparse_matmul_gpu_internal.cuh), with the host copies of the column view;
    # the narrow kernel (no NaN) elsewhere and under SetTuning(46).
    sparse = random_layout(40, 8, 32, 0.1, rng)  # groups share few block rows
    cases = [(Layout(ring, 24, 24, 32), 1000), (Layout(ring, 24, 24, 32), 600),
             (Layout(ring, 24, 24, 32, host_col_ptr=False), 1000), (sparse, 1000),
             (Layout(ring1, 24, 24, 32), 1000), (layouts[0], 1000)]
    for (L, N), tuning in itertools.product(cases, (0, 46)):
        shared = L.group_rows() <= 0.42 * L.blocks
        grouped = shared and N >= 1000 and L.table_array[5] is not None and tuning == 0
        r = int(L.block_row.min())  # the ring's row 0: blocks in columns 0-2, none in 3
        ok, groups = infinity_reaches_groups(lib, gen, L, N, tuning, r, 4 if grouped else 1)
        res.check(ok, f"SetTuning({tuning}) takes the grouped forward where it should "
                      f"({grouped}): KB={L.KB} blocks={L.blocks} N={N} host copies="
                      f"{L.table_array[5] is not None}")


def infinity_reaches_groups(lib, gen, L, N, tuning, r, cols):
    """The forward (bs 32, bf16, feature axis 1) of an x with an infinity at x[7, 32 r + 5]
    under SetTuning(tuning): whether y's row 7 is infinite exactly in the columns with a block
    in block row r, NaN exactly in the other columns of the groups of `cols` block columns that
    hold such a block (cols 1: none, as the narrow kernels give), and every other element is
    finite; and those groups."""
    mask = L.mask()
    x = torch.randn(N, L.CB * 32, generator=gen, device="cuda").to(torch.bfloat16)
    x[7, r * 32 + 5] = float("inf")
    w = torch.randn(L.blocks, 32, 32, generator=gen, device="cuda").to(torch.bfloat16)
    (rc, y), = forwards_under(lib, "bfloat16", x, w, N, 1, [(L, tuning)])
    groups = [g for g in range((L.KB + cols - 1) // cols)
              if mask[r, g * cols:(g + 1) * cols].any()]
    in_groups = np.zeros(L.KB * 32, bool)
    for g in groups:
        in_groups[g * cols * 32:(g + 1) * cols * 32] = True
    stored = np.repeat(mask[r], 32)
    nan = torch.isnan(y[7]).cpu().numpy()
    inf = torch.isinf(y[7]).cpu().numpy()
    others = torch.cat([y[:7], y[8:]])
    ok = (rc == 0 and (nan == (in_groups & ~stored)).all() and (inf == stored).all()
          and bool(torch.isfinite(others).all()))
    return ok, groups


def cover_bytes(lib, dt, N, fa, L, grad_w):
    """The workspace a call asks for with transposed batches off (SetTuning(30) in place of the
    default): what its cover alone asks for."""
    if lib.tuning != 0:
        return lib.workspace_bytes(dt, N, fa, L, grad_w)
    lib.set_tuning(30)
    try:
        return lib.workspace_bytes(dt, N, fa, L, grad_w)
    finally:
        lib.set_tuning(0)


def full_layout_checks(lib, res, gen, rng, quick=False, race=False):
    """Layouts of 8-, 16- and 32-wide blocks run as 64-wide blocks on their cover, with a
    workspace: full layouts (blocks in random order) and partial ones (the cover's blocks
    partly zeros; an empty block row and column) on a rectangular W; whether the default's rule
    asks for the workspace (large batches of full layouts and well-filled covers, not thin
    ones); forward, input gradient and dW against float64 from N = 16 (SetTuning(29) takes the
    workspace wherever a cover exists), ragged batches, both feature axes; the same results
    twice, bit for bit (the workspace filled with NaN bytes before every call); and a layout
    64-wide blocks do not cover (no workspace).  Under another --tuning (3: the mma.sync
    kernels) the default's rule runs, at 2056 rows."""
    dts = ["bfloat16"] if race else list(DTYPES)
    tuning = lib.tuning
    lib.use_workspace = lib.poison_workspace = True
    for dt, bs in itertools.product(dts, [16] if race else [8, 16, 32]):
        full = random_layout(128 // bs, 192 // bs, bs, 1.1, rng)  # every block, random order
        f = 64 // bs  # narrow blocks per 64-wide block, each way
        part = random_layout(128 // bs, 192 // bs, bs, 0.45, rng, empty_rows=range(f, 2 * f),
                             empty_cols=range(f, 2 * f))  # a cover row and column empty
        for grad_w in (False, True):
            ws = lib.workspace_bytes(dt, 4096, 1, full, grad_w)
            res.check(ws >= 128 * 192 * DTYPES[dt][1].itemsize,
                      f"full layout asks for a workspace: {dt} bs={bs} grad_w={grad_w} ({ws} B)")
        # One narrow block in each 64-wide block: a cover filled 1 / f^2, too thin to take.
        thin = Layout(np.argwhere(np.ones((2, 3), bool)) * f, 128 // bs, 192 // bs, bs)
        res.check(thin.cover is not None and cover_bytes(lib, dt, 4096, 1, thin, False) == 0,
                  f"no workspace for a thinly filled cover: {dt} bs={bs}")
        if dt != "float32" and bs == 16:  # a cover filled 0.3-0.6: taken at long batches only
            res.check(cover_bytes(lib, dt, 4096, 1, part, False) > 0 and
                      cover_bytes(lib, dt, 64, 1, part, False) == 0,
                      f"workspace for a partial cover at 4096 rows, not at 64: {dt} bs={bs}")
        for L in ([full] if race else [full, part]):
            if tuning == 0:
                lib.set_tuning(29)
            cases = ((1, 264), (0, 264)) if quick or race else (
                (1, 264), (0, 264), (1, 300), (1, 17), (0, 16))
            if tuning != 0:
                cases = ((1, 2056), (0, 2056))
            for fa, N in cases:
                if tuning == 0:  # every product of the case on the cover
                    asked = [lib.workspace_bytes(dt, N, fa, L, False),
                             lib.workspace_bytes(dt, N, fa, L, True),
                             lib.workspace_bytes(dt, N, fa, L.transposed(), False)]
                    res.check(min(asked) > 0,
                              f"cover taken: {dt} bs={bs} blocks={L.blocks} N={N} fa={fa} {asked}")
                run_case(lib, res, dt, bs, L, N, fa, gen, ops=("fwd", "dw", "dx"))
            if not (quick or race):
                x = torch.randn(264, 128, generator=gen, device="cuda").to(DTYPES[dt][1])
                w = torch.randn(L.blocks, bs, bs, generator=gen, device="cuda").to(x.dtype)
                ys = [torch.full((264, 192), float("nan"), dtype=x.dtype, device="cuda")
                      for _ in (0, 1)]
                rcs = [lib.forward(dt, x, w, y, 264, 1, L) for y in ys]
                torch.cuda.synchronize()
                res.check(rcs == [0, 0] and same_bits(ys[0], ys[1]),
                          f"64-wide blocks deterministic: {dt} bs={bs} blocks={L.blocks}")
            lib.set_tuning(tuning)
    if not race:  # 96 x 160 features: 64-wide blocks do not cover them
        L = random_layout(96 // 16, 160 // 16, 16, 1.1, rng)
        res.check(L.cover is None and cover_bytes(lib, "bfloat16", 4096, 1, L, False) == 0,
                  "no workspace for a full layout 64-wide blocks do not divide")
        run_case(lib, res, "bfloat16", 16, L, 264, 1, gen, ops=("fwd", "dw", "dx"))
    lib.use_workspace = lib.poison_workspace = False


def transposed_batch_checks(lib, res, gen, rng, quick=False, race=False):
    """16-bit bs-16 products with feature axis 1 on feature axis 0's kernels (x and dy
    transposed into the workspace, y transposed back; Hopper's wgmma kernels only): under
    SetTuning(32), forward, dW and input gradient against float64 on a layout without a cover
    (10 x 7 blocks, an empty block row and column), the forward in passes of 256 rows (N = 520:
    two full passes and one of 8 rows), the workspace filled with NaN bytes before every call;
    bit for bit the products of feature axis 0 on transposed copies (N = 256, one pass); the
    default's rule ((density - 0.04) N >= 40 rows, 0.015 where x outgrows the L2, not with
    float32 or a cover)."""
    if torch.cuda.get_device_capability()[0] != 9 or lib.tuning != 0:
        return  # the wgmma kernels are off (SetTuning 1-4) or absent
    tuning = lib.tuning
    lib.use_workspace = lib.poison_workspace = True
    L = random_layout(10, 7, 16, 0.3, rng, empty_rows=[2], empty_cols=[3])
    C, K = L.CB * 16, L.KB * 16
    for dt in ["bfloat16"] if race else ["bfloat16", "float16"]:
        tdt = DTYPES[dt][1]
        lib.set_tuning(0)
        # The rule (kTransposedMinDensity, kTransposedMinExcess in blocksparse_matmul_gpu.cu).
        density = L.blocks / (L.CB * L.KB)
        cases = [(N, fa, gw) for N in (72, 96, 128, 160, 256, 4096, 4100)
                 for fa, gw in ((1, False), (1, True), (0, False))]
        asked = [lib.workspace_bytes(dt, N, fa, L, gw) for N, fa, gw in cases]
        expected = [(C + K) * N * 2 if fa == 1 and N % 8 == 0 and (density - 0.04) * N >= 40
                    else 0 for N, fa, gw in cases]
        declined = [e == 0 for (N, fa, _), e in zip(cases, expected) if fa == 1 and N % 8 == 0]
        res.check(asked == expected and any(declined) and not all(declined),
                  f"transposed batches asked for where the rule says (feature axis 1, N % 8 == "
                  f"0, (density - 0.04) N >= 40): {dt} density {density:.3f} {asked} {expected}")
        # Where x outgrows the L2 the least density drops from 4% to 1.5%: a 2% layout of C =
        # K = 8192 at 16384 rows (x 256 MiB), not at 2048 (x 32 MiB).
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        big = random_layout(512, 512, 16, 0.02, rng)
        asked = [lib.workspace_bytes(dt, N, 1, big, gw) > 0 for N in (2048, 16384)
                 for gw in (False, True)]
        applies = 2048 * 8192 * 2 < l2 <= 16384 * 8192 * 2  # the L2 of an H100 or H200
        res.check(not applies or asked == [False, False, True, True],
                  f"transposed batches at 2% density where x outgrows the L2: {dt} {asked}")
        # Not for float32, and a cover the rule takes comes first: a full 4 x 4-block layout
        # asks for its cover's bytes alone.
        full = Layout(np.argwhere(np.ones((4, 4), bool)), 4, 4, 16)
        covered = lib.workspace_bytes(dt, 4096, 1, full, False)
        res.check(lib.workspace_bytes("float32", 4096, 1, L, False) == 0 and
                  covered == cover_bytes(lib, dt, 4096, 1, full, False) > 0 and
                  covered != 128 * 4096 * 2,
                  f"transposed batches neither for float32 nor before a cover: {dt} {covered}")
        lib.set_tuning(32)
        for N in [264] if race or quick else [264, 520, 1000]:
            res.check(lib.workspace_bytes(dt, N, 1, L, False) == (C + K) * min(N, 256) * 2 and
                      lib.workspace_bytes(dt, N, 1, L, True) == (C + K) * N * 2,
                      f"transposed batches under SetTuning(32): {dt} N={N}")
            run_case(lib, res, dt, 16, L, N, 1, gen, ops=("fwd", "dw", "dx"))
        if race:
            continue
        x = torch.randn(256, C, generator=gen, device="cuda").to(tdt)
        dy = torch.randn(256, K, generator=gen, device="cuda").to(tdt)
        w = torch.randn(L.blocks, 16, 16, generator=gen, device="cuda").to(tdt)
        y = torch.full((256, K), float("nan"), dtype=tdt, device="cuda")
        y0 = torch.full((K, 256), float("nan"), dtype=tdt, device="cuda")
        dw = torch.full((L.blocks, 16, 16), float("nan"), dtype=tdt, device="cuda")
        dw0 = torch.full_like(dw, float("nan"))
        # The workspace, NaN-filled before each call, then holds x^T (and dy^T): the call took
        # the transposed batches rather than feature axis 1's kernels.
        ws = lambda rows, off=0: lib._workspace[2 * off * 256:2 * (off + rows) * 256].view(
            tdt).view(rows, 256)
        rcs = [lib.forward(dt, x, w, y, 256, 1, L)]
        torch.cuda.synchronize()
        took = [same_bits(ws(C), x.t().contiguous())]
        rcs.append(lib.grad_w(dt, x, dy, dw, 256, 1, L))
        torch.cuda.synchronize()
        took.append(same_bits(ws(C), x.t().contiguous()) and
                    same_bits(ws(K, C), dy.t().contiguous()))
        rcs += [lib.forward(dt, x.t().contiguous(), w, y0, 256, 0, L),
                lib.grad_w(dt, x.t().contiguous(), dy.t().contiguous(), dw0, 256, 0, L)]
        torch.cuda.synchronize()
        res.check(rcs == [0] * 4 and took == [True, True],
                  f"transposed batches taken (x^T, dy^T in the workspace): {dt} {rcs} {took}")
        res.check(same_bits(y, y0.t().contiguous()) and same_bits(dw, dw0),
                  f"transposed batches = feature axis 0 on transposed copies, bit for bit: {dt}")
    lib.set_tuning(tuning)
    lib.use_workspace = lib.poison_workspace = False


def correctness(lib, res, quick=False, race=False):
    rng = np.random.default_rng(1234)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    bss = [1, 8, 16, 32, 64]
    Ns = [0, 1, 8, 17, 64, 130, 264, 1000]
    dts = list(DTYPES)
    if quick:  # the subset run under compute-sanitizer memcheck
        bss, Ns, dts = [1, 8, 16, 32, 64], [17, 136], ["float32", "float16", "bfloat16"]
    if race:  # the subset run under racecheck: tensor-core kernels, pipelines wrapping around
        bss, Ns, dts = [16, 32, 64], [64, 1000], ["bfloat16"]  # small- and long-batch tiles
        # The mma.sync forwards reading w's blocks transposed (the input gradient): float32,
        # and bfloat16 with the wgmma kernels off (SetTuning(3)).
        tuning = lib.tuning
        for dt, tune, N in (("float32", tuning, 136), ("bfloat16", 3, 64), ("bfloat16", 3, 264)):
            lib.set_tuning(tune)
            for bs in bss:
                L = random_layout(24, 6, bs, 0.5, rng, empty_cols=[1])
                for fa in (1, 0):
                    run_case(lib, res, dt, bs, L, N, fa, gen, ops=("dx",))
        lib.set_tuning(tuning)
        for bs in bss:  # grouped dW tiles
            L = random_layout(64, 4, bs, 0.9, rng, empty_cols=[1])
            for fa in (1, 0):
                run_case(lib, res, "bfloat16", bs, L, 264, fa, gen, ops=("dw",))
                if bs == 64:  # the float32 bs-64 dW on four warps: pairs, then single blocks
                    run_case(lib, res, "float32", 64, L, 264, fa, gen, ops=("dw",))
                    run_case(lib, res, "float32", 64, random_layout(14, 9, 64, 0.65, rng),
                             200, fa, gen, ops=("dw",))
        # The float32 bs-16 forward's two-stage pipeline (256-row tiles), wrapping around.
        L = random_layout(64, 4, 16, 0.5, rng)
        for fa in (1, 0):
            run_case(lib, res, "float32", 16, L, 300, fa, gen, ops=("fwd",))
    # The float32 bs-16 tiles chosen by batch size and column length: small batches with long
    # columns (two 64-row warps, each a block of a step) and short ones (feature axis 0: a
    # step's blocks split between warps), 65-128 rows (feature axis 1: the same split), and the
    # dW's pairs of blocks (8 to 40 blocks per column); pipelines wrapping around.
    f32_bs16_layouts = [random_layout(64, 4, 16, 0.9, rng, empty_cols=[2]),  # ~58 per column
                        random_layout(20, 9, 16, 0.65, rng, empty_cols=[4])]  # ~13
    for L in f32_bs16_layouts:
        for N in ([64, 100] if quick or race else [1, 40, 64, 65, 100, 128]):
            for fa in (1, 0):
                run_case(lib, res, "float32", 16, L, N, fa, gen, ops=("fwd",))
        for fa in (1, 0):
            run_case(lib, res, "float32", 16, L, 264, fa, gen, ops=("dw",))
    # float32 bs 32 (two stages) and bs 64 from 2048 rows (128-row tiles, two stages): the
    # pipelines wrapping around, a ragged last row tile, an empty block column.
    for bs, N in ((32, 1000), (64, 2048 if race else 2100)):
        L = random_layout(20, 9, bs, 0.65, rng, empty_cols=[4])
        for fa in (1, 0):
            run_case(lib, res, "float32", bs, L, N, fa, gen, ops=("fwd",))
    # Many more output tiles than resident CTAs, so the persistent wgmma forward (Hopper,
    # 16-bit bs 64) takes several tiles per CTA, some with no blocks, and ragged last tiles
    # (from 512 rows the narrow kernel is the default: SetTuning(20) keeps this one).
    L = random_layout(16, 160, 64, 0.3, rng, empty_cols=[0, 7, 100, 159])
    tuning = lib.tuning
    if tuning == 0:
        lib.set_tuning(20)
    for dt in (["bfloat16"] if quick or race else ["bfloat16", "float16"]):
        for fa in (1, 0):
            run_case(lib, res, dt, 64, L, 1000 if quick or race else 2000, fa, gen,
                     ops=("fwd",))
    lib.set_tuning(tuning)
    # The same layout on the narrow kernel's 192-row tiles (many CTAs, one tile each).
    if tuning == 0 and not (quick or race):
        for fa in (1, 0):
            run_case(lib, res, "bfloat16", 64, L, 4104, fa, gen, ops=("fwd",))
    # More block columns than a CTA has threads, so the column-group dW (Hopper, 16-bit)
    # scans the column list in several passes to find its group; empty columns in between.
    for bs in ([16] if quick or race else [16, 32]):
        L = random_layout(6, 300, bs, 0.5, rng, empty_cols=[0, 128, 129, 299])
        for fa in (1, 0):
            run_case(lib, res, "bfloat16", bs, L, 136 if quick or race else 264, fa, gen,
                     ops=("dw",))
    # Far more column groups than CTAs fit on the GPU (Hopper, 16-bit dW, N > 64): many waves
    # of one group per CTA.
    for bs in ([16] if quick or race else [16, 32]):
        L = random_layout(64, 640, bs, 0.45, rng, empty_cols=[5, 600])
        for fa in (1, 0):
            run_case(lib, res, "bfloat16", bs, L, 136 if quick or race else 264, fa, gen,
                     ops=("dw",))
    # The same, paced (Hopper, bs 16, feature axis 1, N >= 8192; SetTuning(8) paces even
    # where x fits in L2): a persistent grid whose CTAs take several groups each, longest
    # first (whole ones, then the partial last ones of the columns by their length), the
    # last of them past the last group.
    # (Not under racecheck: at 8200 rows over a grid of that size it ran past 3 minutes; the
    # next case stands in for it there.)
    # bs 32's 8-block groups are paced too (from 75% density down where the groups are many).
    if is_hopper() and lib.tuning == 0 and not race:
        for bs in (16, 32):
            lib.set_tuning(8)
            L = random_layout(40 * 16 // bs, 100 if quick else 300, bs, 0.9, rng,
                              empty_cols=[3])
            run_case(lib, res, "bfloat16", bs, L, 8200, 1, gen, ops=("dw",))
            if not quick:
                run_case(lib, res, "float16", bs, L, 8192, 1, gen, ops=("dw",))
                # Paced and one group per CTA (SetTuning(7)) make the same sums, bit for bit:
                # the unpaced groups are too many here for a cluster split (which changes the
                # order).
                N = 8200
                x = torch.randn(N, L.CB * bs, generator=gen, device="cuda").bfloat16()
                dy = torch.randn(N, L.KB * bs, generator=gen, device="cuda").bfloat16()
                outs = []
                for tuning in (8, 7):
                    lib.set_tuning(tuning)
                    dw = torch.full((L.blocks, bs, bs), float("nan"), dtype=torch.bfloat16,
                                    device="cuda")
                    outs.append((lib.grad_w("bfloat16", x, dy, dw, N, 1, L),
                                 dw.view(torch.int16)))
                    torch.cuda.synchronize()
                res.check(all(rc == 0 for rc, _ in outs) and same_bits(outs[0][1], outs[1][1]),
                          f"paced dW (tuning 8) equals unpaced (tuning 7) bitwise, bs={bs} N={N}")
        lib.set_tuning(0)
    # The paced kernel on a grid of 3 CTAs (SetTuning(9)), small enough for racecheck: about
    # 9 groups (two whole and one partial per non-empty column), 3 or more per CTA (bs 32 over
    # 2048 rows under racecheck, which with 8192 ran the subset past five minutes).
    if is_hopper() and lib.tuning == 0:
        lib.set_tuning(9)
        for bs in (16, 32):
            L = random_layout(40 * 16 // bs, 4, bs, 0.9, rng, empty_cols=[2])
            N = (8192 if bs == 16 else 2048) if race else 8200
            run_case(lib, res, "bfloat16", bs, L, N, 1, gen, ops=("dw",))
        lib.set_tuning(0)
    # The default's paced bs-32 dW: x (16384 x 8192) over four times the L2, 25% density, the
    # groups (about 2000) many times the CTAs that fit.
    if is_hopper() and lib.tuning == 0 and not quick and not race:
        L = random_layout(256, 256, 32, 0.25, rng)
        run_case(lib, res, "bfloat16", 32, L, 16384, 1, gen, ops=("dw",))
    # bs-32 dW groups sized by the columns' average length (Hopper, 16-bit, N > 64): about 5
    # blocks per column (groups of 4) and about 2 (groups of 2), several groups in the longer
    # columns, an empty column.
    for CB in (12, 5):
        L = random_layout(CB, 7, 32, 0.5, rng, empty_cols=[3])
        for dt in (["bfloat16"] if quick or race else ["bfloat16", "float16"]):
            for N in ([136] if quick else [1000] if race else [130, 1000]):
                for fa in (1, 0):
                    run_case(lib, res, dt, 32, L, N, fa, gen, ops=("dw",))
    # The wgmma dW with x and dy copied on the copy engine (SetTuning(13); Hopper, with feature
    # axis 0 where N % 8 == 0; the default for feature axis 1 with bs 64, and bs 32 where x fits
    # in the L2) makes the same sums in the same order as with its cp.async copies
    # (SetTuning(14)), bit for bit: bs 16 / 32 / 64 (8-, 4- and 2-block groups for bs 32),
    # columns whose last group is partial, an empty column, a ragged last batch step, few
    # columns that a cluster splits.  Every N is a multiple of 8, so that feature axis 0 too
    # takes the copy engine under SetTuning(13) (else both runs would be the same kernel).
    if is_hopper() and lib.tuning == 0:
        cases = [(16, random_layout(20, 9, 16, 0.7, rng, empty_cols=[4]), 1000),
                 (32, random_layout(24, 9, 32, 0.5, rng, empty_cols=[2]), 1000),
                 (32, random_layout(12, 7, 32, 0.5, rng, empty_cols=[3]), 136),
                 (32, random_layout(5, 7, 32, 0.6, rng), 4104),
                 (64, random_layout(20, 5, 64, 0.6, rng, empty_cols=[1]), 1000),
                 (32, random_layout(64, 2, 32, 0.9, rng), 8200)]
        if race:  # small enough for racecheck: pipelines wrapping around, a partial group
            cases = [(32, random_layout(12, 3, 32, 0.6, rng), 136)]
        for (bs, L, N), fa in itertools.product(cases[:2] if quick else cases, (1, 0)):
            for dt in ["bfloat16"] if quick or race else ["bfloat16", "float16"]:
                tdt = DTYPES[dt][1]
                x = torch.randn(*((N, L.CB * bs) if fa else (L.CB * bs, N)), generator=gen,
                                device="cuda").to(tdt)
                dy = torch.randn(*((N, L.KB * bs) if fa else (L.KB * bs, N)), generator=gen,
                                 device="cuda").to(tdt)
                outs = []
                for tuning in (13, 14):
                    lib.set_tuning(tuning)
                    dw = torch.full((L.blocks, bs, bs), float("nan"), dtype=tdt, device="cuda")
                    rc = lib.grad_w(dt, x, dy, dw, N, fa, L)
                    torch.cuda.synchronize()
                    outs.append((rc, dw.view(torch.int16)))
                res.check(all(rc == 0 for rc, _ in outs) and same_bits(outs[0][1], outs[1][1]),
                          f"dW on the copy engine equals cp.async bitwise: {dt} bs={bs} "
                          f"CB={L.CB} KB={L.KB} blocks={L.blocks} N={N} fa={fa}")
                lib.set_tuning(13)
                run_case(lib, res, dt, bs, L, N, fa, gen, ops=("dw",))
                lib.set_tuning(0)
    # bs-64 dW groups (Hopper, 16-bit, N > 64): 8 blocks on two warpgroups (SetTuning(24); the
    # default with feature axis 1 where x is several times the L2) and 4 on one (SetTuning(25);
    # the default on long columns), and the same with cp.async copies (SetTuning(26), (27)),
    # against float64: columns of about 19 blocks (8 under racecheck) with an empty one
    # (partial last groups; groups few enough for a cluster to split them), a ragged last batch
    # step.  Then, on 100 columns (too many groups for a split), bit for bit against the
    # 2-block groups (SetTuning(23)): the same sums in the same order.
    if is_hopper() and lib.tuning == 0:
        L = random_layout(10 if race else 24, 2 if race else 6, 64, 0.8, rng, empty_cols=[1])
        N = 136 if race else 4104
        for tuning, fa in itertools.product((24, 25, 26, 27), (1, 0)):
            lib.set_tuning(tuning)
            for dt in ["bfloat16"] if quick or race else ["bfloat16", "float16"]:
                run_case(lib, res, dt, 64, L, N, fa, gen, ops=("dw",))
        lib.set_tuning(0)
        if not race:
            L = random_layout(20, 100, 64, 0.6, rng, empty_cols=[7])
            N = 1000
            for fa in (1, 0):
                x = torch.randn(*((N, L.CB * 64) if fa else (L.CB * 64, N)), generator=gen,
                                device="cuda").bfloat16()
                dy = torch.randn(*((N, L.KB * 64) if fa else (L.KB * 64, N)), generator=gen,
                                 device="cuda").bfloat16()
                outs = []
                for tuning in (23, 24, 25, 26, 27):
                    lib.set_tuning(tuning)
                    dw = torch.full((L.blocks, 64, 64), float("nan"), dtype=torch.bfloat16,
                                    device="cuda")
                    rc = lib.grad_w("bfloat16", x, dy, dw, N, fa, L)
                    torch.cuda.synchronize()
                    outs.append((rc, dw.view(torch.int16)))
                lib.set_tuning(0)
                res.check(all(rc == 0 for rc, _ in outs) and
                          all(same_bits(outs[0][1], o) for _, o in outs[1:]),
                          f"bs-64 dW groups of 2 / 8 / 4 blocks (copy engine, cp.async) equal "
                          f"bitwise: blocks={L.blocks} N={N} fa={fa}")
        if not quick and not race:
            # The default's 8-block groups: x (16384 x 8192) over four times the L2.
            L = random_layout(128, 3, 64, 0.5, rng)
            run_case(lib, res, "bfloat16", 64, L, 16384, 1, gen, ops=("dw",))
    # Column runs (the float32 mma.sync forward, feature axis 1, N > 64): a CTA computes 2, 4
    # or 8 consecutive block columns (SetTuning(15), (16), (17); the default takes 2 for bs 32 /
    # 64 from 2048 rows where columns are short), its copies running on from one column into
    # the next.  Every run length against the float64 product, and bit for bit the same as the
    # others (the same sums in the same order; one CTA per column, SetTuning(18), may split a
    # tile over a cluster, which changes the order); the forward and the input gradient (w read
    # transposed): empty columns at a run's start, inside it and at its end, a column count no
    # run length divides, a ragged last row tile; bs 16 (256-row tiles), 32, 64 (64-row tiles
    # below 2048 rows, 128-row from there).
    if lib.tuning == 0:
        runs_cases = [(16, 300), (32, 1000), (32, 2100), (64, 1000), (64, 2100)]
        if quick or race:
            runs_cases = [(32, 136)] if race else [(16, 136), (64, 2100)]
        for bs, N in runs_cases:
            L = random_layout(9, 21, bs, 0.3, rng, empty_cols=[0, 5, 6, 7, 20])
            LT = L.transposed()
            x = torch.randn(N, L.CB * bs, generator=gen, device="cuda")
            w = torch.randn(L.blocks, bs, bs, generator=gen, device="cuda")
            dy = torch.randn(N, L.KB * bs, generator=gen, device="cuda")
            W64 = L.dense(w).double()
            y_ref, dx_ref = x.double() @ W64, dy.double() @ W64.t()
            outs = {}
            for tuning in (15, 16, 17, 0):
                lib.set_tuning(tuning)
                y = torch.full((N, L.KB * bs), float("nan"), device="cuda")
                dx = torch.full((N, L.CB * bs), float("nan"), device="cuda")
                rc = (lib.forward("float32", x, w, y, N, 1, L),
                      lib.forward_transposed_w("float32", dy, w, dx, N, 1, LT))
                torch.cuda.synchronize()
                outs[tuning] = (y, dx)
                e = max(rel_err(y, y_ref), rel_err(dx, dx_ref)) if rc == (0, 0) else float("inf")
                res.check(e <= TOL["float32"], f"float32 forward and dx, tuning {tuning} "
                          f"(column runs), bs={bs} N={N} KB={L.KB} relerr={e:.3g}")
            lib.set_tuning(0)
            for tuning in (16, 17):
                res.check(all(same_bits(a, b) for a, b in zip(outs[tuning], outs[15])),
                          f"float32 forward and dx in runs of {2 ** (tuning - 14)} columns "
                          f"equal runs of 2 bitwise: bs={bs} N={N}")
    # Small batches with full bs-16 columns: dW streams runs of a column's blocks through one
    # CTA (Hopper, 16-bit, at least 6 blocks per column; several runs per column).
    L = random_layout(48, 3, 16, 0.9, rng, empty_cols=[1])
    for N in ([17, 64] if quick or race else [1, 17, 40, 64]):
        for fa in (1, 0):
            run_case(lib, res, "bfloat16", 16, L, N, fa, gen, ops=("dw",))
            if not quick:
                run_case(lib, res, "float32", 16, L, N, fa, gen, ops=("dw",))
    # Small batches with bs 16 / 32 / 64: the forward streams each block column through its
    # pipeline, several blocks per step (Hopper, 16-bit), and so does dW (runs of a column's
    # blocks per CTA).  Columns long enough that the pipelines wrap around, a last step with
    # fewer blocks; from 64 (bs 32) or 32 (bs 64) blocks per column on average over the
    # layout, and for bs 16 with feature axis 0 or N <= 16, every forward column is split over
    # a cluster of two CTAs where the GPU has room (the even-numbered layouts: an empty column
    # and a one-block column, whose ranks get no blocks, among full ones).  bs 16 with feature
    # axis 1 keeps the mma.sync tiles with N > 16 and columns over 75% full (the second
    # layout), and with N <= 16 and fewer than 32 blocks per column (the first).
    def columns_layout(CB, counts, bs):
        coords = [(c, k) for k, count in enumerate(counts) for c in range(count)]
        return Layout(coords, CB, len(counts), bs)

    small_batch_layouts = [
        (16, random_layout(64, 3, 16, 0.5, rng, empty_cols=[1])),  # ~32 per non-empty column
        (16, columns_layout(64, [64, 64, 1, 64, 64, 0, 64, 64, 64, 64], 16)),  # 90% full
        (32, random_layout(48, 3, 32, 0.9, rng, empty_cols=[1])),  # ~43 per non-empty column
        (32, columns_layout(128, [128, 1, 0, 128], 32)),  # 64.25: split
        (64, random_layout(40, 3, 64, 0.5, rng, empty_cols=[1])),  # ~20 per non-empty column
        (64, columns_layout(64, [64, 0, 64, 1], 64)),  # 32.25: split
    ]
    for bs, L in small_batch_layouts:
        for N in ([16, 17, 64] if quick or race else [1, 16, 17, 32, 40, 64]):
            for fa in (1, 0):
                run_case(lib, res, "bfloat16", bs, L, N, fa, gen, ops=("fwd", "dx", "dw"))
        if is_hopper() and lib.tuning == 0 and not race:
            # Those forwards copy on the copy engine; SetTuning(6) runs their cp.async copies.
            lib.set_tuning(6)
            for N in [17, 64] if quick else [1, 40, 64]:
                for fa in (1, 0):
                    run_case(lib, res, "bfloat16", bs, L, N, fa, gen, ops=("fwd", "dx"))
            lib.set_tuning(0)
        if not (quick or race):
            run_case(lib, res, "float16", bs, L, 64, 1, gen, ops=("fwd", "dx", "dw"))
        if bs == 32 and not quick:  # the float32 small-batch dW (3xTF32)
            for N in ([64] if race else [1, 20, 32, 64]):
                for fa in (1, 0):
                    run_case(lib, res, "float32", bs, L, N, fa, gen, ops=("dw",))
    if is_hopper() and lib.tuning == 0 and not (quick or race):
        # The bs-16 / bs-32 forward with N > 64 copies on the copy engine too: its cp.async copies.
        lib.set_tuning(6)
        for bs in (16, 32):
            L = random_layout(20, 9, bs, 0.65, rng, empty_cols=[4])
            for N in (130, 1000):
                for fa in (1, 0):
                    run_case(lib, res, "bfloat16", bs, L, N, fa, gen, ops=("fwd", "dx"))
        lib.set_tuning(0)
    # Long batches: the bs-16 column groups of 16 blocks (Hopper, 16-bit, N >= 8192), several
    # groups per column and a partial last one, a ragged last step.
    if not race:
        L = random_layout(40, 3, 16, 0.9, rng, empty_cols=[2])
        for fa in (1, 0):
            run_case(lib, res, "bfloat16", 16, L, 8200, fa, gen, ops=("dw",))
    for bs in bss:
        layouts = []
        if not race:
            # rectangular, an empty block row (1) and an empty block column (2)
            layouts.append(random_layout(5, 3, bs, 0.7, rng, empty_rows=[1], empty_cols=[2]))
        if not (quick and bs < 16):
            # many blocks per column, so the pipelines wrap around; one empty column
            layouts.append(random_layout(20 if bs < 64 else 14, 9, bs, 0.65, rng, empty_cols=[4]))
        if not quick and bs >= 16:
            # ~58 blocks per column: dW groups several blocks of a column per tile
            layouts.append(random_layout(64, 4, bs, 0.9, rng, empty_cols=[1]))
        for L in layouts:
            for dt in dts:
                for fa in (1, 0):
                    for N in Ns:
                        if L.CB == 64 and N not in (17, 264, 1000):
                            continue
                        run_case(lib, res, dt, bs, L, N, fa, gen,
                                 ops=("fwd", "dw", "dx") if N in (17, 64, 136, 264)
                                 else ("fwd", "dw"))
    empty_layout_checks(lib, res, quick or race)
    full_layout_checks(lib, res, gen, rng, quick, race)
    transposed_batch_checks(lib, res, gen, rng, quick, race)
    if not race:
        bs64_narrow_checks(lib, res, gen, rng, quick)
        run_start_checks(lib, res, gen, rng, quick)
        grouped_checks(lib, res, gen, rng, quick)
    if quick or race:
        return
    # Long reductions (4096 products per output; 8192 batch rows for dW): float32 accuracy
    # must hold there too, not only on the short sums above.
    for bs in (16, 32, 64):
        Lf = random_layout(4096 // bs, 2, bs, 1.0, rng)
        Lg = random_layout(2, 2, bs, 1.0, rng)
        for dt in dts:
            for fa in (1, 0):
                run_case(lib, res, dt, bs, Lf, 64, fa, gen, ops=("fwd",))
                run_case(lib, res, dt, bs, Lg, 8192, fa, gen, ops=("dw",))
    # 16-bit bs-32 dW with feature axis 0 over long batches: 4-block groups (Hopper; see
    # kColumnGradBs32FourBlocksAxis0Work), columns of about 30 blocks, ragged last groups and
    # a ragged last batch step; feature axis 1 (8-block groups) beside it.
    Lh = random_layout(40, 3, 32, 0.75, rng)
    for dt in ("float16", "bfloat16"):
        for fa in (0, 1):
            run_case(lib, res, dt, 32, Lh, 4100, fa, gen, ops=("dw",))
    # Unaligned pointers (a view at an odd element offset) must fall back and stay correct.
    for dt in ("float16", "bfloat16"):
        bs, N = 32, 70
        L = random_layout(4, 3, bs, 0.8, rng)
        tdt = DTYPES[dt][1]
        C, K = 4 * bs, 3 * bs
        w = torch.randn(L.blocks, bs, bs, generator=gen, device="cuda").to(tdt)
        buf = torch.randn(N * C + 1, generator=gen, device="cuda").to(tdt)
        x = buf[1:].view(N, C)
        y = torch.full((N, K), float("nan"), dtype=tdt, device="cuda")
        rc = lib.forward(dt, x, w, y, N, 1, L)
        torch.cuda.synchronize()
        e = rel_err(y, x.double() @ L.dense(w).double())
        res.check(rc == 0 and e <= TOL[dt], f"unaligned x forward {dt} rc={rc} relerr={e:.3g}")
    # The input gradient's product with w's blocks at an odd element offset (the CUDA-core
    # kernel, reading element by element rather than whole rows), bit for bit the forward on
    # a transposed copy at the same offset.
    for dt, bs in (("float32", 8), ("bfloat16", 8), ("bfloat16", 32)):
        N = 70
        L = random_layout(4, 3, bs, 0.8, rng)
        LT = L.transposed()
        tdt = DTYPES[dt][1]
        buf = torch.randn(L.blocks * bs * bs + 1, generator=gen, device="cuda").to(tdt)
        w = buf[1:].view(L.blocks, bs, bs)
        dy = torch.randn(N, 3 * bs, generator=gen, device="cuda").to(tdt)
        dx = torch.full((N, 4 * bs), float("nan"), dtype=tdt, device="cuda")
        rc = lib.forward_transposed_w(dt, dy, w, dx, N, 1, LT)
        dx_copy = torch.full_like(dx, float("nan"))
        copy_buf = torch.full_like(buf, float("nan"))
        w_copy = copy_buf[1:].view(L.blocks, bs, bs)
        w_copy.copy_(w.transpose(1, 2))
        rc2 = lib.forward(dt, dy, w_copy, dx_copy, N, 1, LT)
        torch.cuda.synchronize()
        res.check(rc == 0 and rc2 == 0 and same_bits(dx, dx_copy),
                  f"unaligned w, transposed read {dt} bs={bs} rc={rc}")
    # float32 with an infinity in x (the tensor-core kernels split each value into a TF32 part
    # and a residual, here infinity minus infinity): the sums it enters are NaN, as README.md
    # says, and every other output is finite and within tolerance.
    for bs in (16, 32, 64):
        N, CB, KB = 130, 4, 3
        L = random_layout(CB, KB, bs, 0.8, rng)
        w = torch.randn(L.blocks, bs, bs, generator=gen, device="cuda")
        x = torch.randn(N, CB * bs, generator=gen, device="cuda")
        feature = int(L.block_row[0]) * bs + 3  # an input feature some block reads
        W64 = L.dense(w).double()
        ref = x.double() @ W64  # row 7 as if x[7, feature] were 0: right where it does not enter
        x[7, feature] = float("inf")
        # A finite start (not NaN): the NaN expected where the infinity enters must be written.
        y = torch.full((N, KB * bs), 12345.0, device="cuda")
        rc = lib.forward("float32", x, w, y, N, 1, L)
        torch.cuda.synchronize()
        hit = W64[feature] != 0  # the outputs whose sums take x[7, feature]
        rest = torch.ones_like(y, dtype=torch.bool)
        rest[7, hit] = False
        e = rel_err(y[rest], ref[rest])  # every other output, row 7's included
        row_ok = bool(torch.isnan(y[7][hit]).all())
        res.check(rc == 0 and e <= TOL["float32"] and row_ok and bool(hit.any()),
                  f"float32 infinity in x: NaN where it enters, bs={bs} rc={rc} relerr={e:.3g}")
    # Determinism on larger problems, both paths and products (16-bit with N > 64: the wgmma
    # forwards on Hopper).
    for dt, bs, fa, N in [("bfloat16", 32, 1, 4096), ("float16", 64, 0, 2048),
                          ("bfloat16", 16, 1, 1000), ("float32", 32, 1, 512),
                          ("bfloat16", 64, 1, 1000), ("float16", 64, 0, 1000),  # wgmma
                          ("float32", 64, 0, 64),  # cluster split
                          ("bfloat16", 32, 0, 64), ("bfloat16", 64, 1, 64),  # small-batch wgmma
                          ("float16", 16, 1, 32), ("float32", 32, 0, 64),  # small-batch dW
                          ("float16", 16, 0, 17)]:  # CUDA-core fallback
        L = exact_layout(32, 32, bs, 0.2, rng)
        tdt = DTYPES[dt][1]
        C, K = L.CB * bs, L.KB * bs
        x = torch.randn(*((N, C) if fa else (C, N)), device="cuda").to(tdt)
        dy = torch.randn(*((N, K) if fa else (K, N)), device="cuda").to(tdt)
        w = torch.randn(L.blocks, bs, bs, device="cuda").to(tdt)
        outs = []
        for run in range(3):
            # Each run's outputs start from another value: an element left unwritten differs.
            y = torch.full((N, K) if fa else (K, N), run + 0.5, dtype=tdt, device="cuda")
            dw = torch.full((L.blocks, bs, bs), run + 0.5, dtype=tdt, device="cuda")
            rc1 = lib.forward(dt, x, w, y, N, fa, L)
            rc2 = lib.grad_w(dt, x, dy, dw, N, fa, L)
            torch.cuda.synchronize()
            outs.append((rc1, rc2, y, dw))
        same = all(o[0] == 0 and o[1] == 0 and same_bits(o[2], outs[0][2])
                   and same_bits(o[3], outs[0][3]) for o in outs)
        res.check(same, f"determinism {dt} bs={bs} fa={fa} N={N}")
    # Determinism of the small-batch forward split over a cluster (16-bit, Hopper): bs 32 / 64,
    # and bs 16 with feature axis 0 or N <= 16.
    for bs, L in small_batch_layouts[1::2]:
        for fa, N in [(1, 64), (0, 64)] + ([(1, 16)] if bs == 16 else []):
            x = torch.randn(*((N, L.CB * bs) if fa else (L.CB * bs, N)), device="cuda").to(
                torch.bfloat16)
            w = torch.randn(L.blocks, bs, bs, device="cuda").to(torch.bfloat16)
            ys = []
            for run in range(3):
                y = torch.full((N, L.KB * bs) if fa else (L.KB * bs, N), run + 0.5,
                               dtype=torch.bfloat16, device="cuda")
                rc = lib.forward("bfloat16", x, w, y, N, fa, L)
                torch.cuda.synchronize()
                ys.append((rc, y.view(torch.int16)))
            res.check(all(rc == 0 and same_bits(y, ys[0][1]) for rc, y in ys),
                      f"determinism small-batch split bfloat16 bs={bs} fa={fa} N={N}")
    if lib.tuning == 0:
        smaller_shared_memory_checks(lib, res, gen, rng)
    # Argument validation: errors come back as codes, nothing is launched.
    L = random_layout(4, 3, 16, 0.8, rng)
    x = torch.randn(8, 64, device="cuda").half()
    w = torch.randn(L.blocks, 16, 16, device="cuda").half()
    y = torch.empty(8, 48, device="cuda").half()
    bad = Layout(np.stack([L.block_row, L.block_col], 1), 4, 3, 16)
    bad.bs = 24
    res.check(lib.forward("float16", x, w, y, 8, 1, bad) != 0, "validation: block size 24")
    res.check(lib.forward("float16", x, w, y, -1, 1, L) != 0, "validation: N < 0")
    res.check(lib.forward("float16", x, w, y, 8, 2, L) != 0, "validation: feature_axis 2")
    res.check(lib.forward("float16", None, w, y, 8, 1, L, raw_ptrs=(None, w.data_ptr(),
                                                                    y.data_ptr())) != 0,
              "validation: null x")
    res.check(lib.grad_w("float16", x, y, None, 8, 1, L, raw_ptrs=(x.data_ptr(), y.data_ptr(),
                                                                   None)) != 0,
              "validation: null dw")
    res.check(lib.err(1) != "", "ErrorString")


def is_hopper():
    return torch.cuda.get_device_capability()[0] == 9


# ----------------------------------------------------------------------------------------------
_flush = None


def flush_l2():
    """Evicts the L2 by reading 256 MB (reads leave clean lines: no write-backs later)."""
    global _flush
    if _flush is None:
        _flush = torch.ones(32 << 20, dtype=torch.float64, device="cuda")
    _flush.sum()


def bench(fn, min_ms=150.0, max_reps=40, min_reps=5):
    """Median of CUDA-event timings (ms), L2 flushed before every run, after warm-up."""
    fn()
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush_l2()
    s.record()
    fn()
    e.record()
    e.synchronize()
    t0 = s.elapsed_time(e)
    reps = int(min(max_reps, max(min_reps, min_ms / max(t0, 1e-3))))
    ts = []
    for _ in range(reps):
        flush_l2()
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def copy_bandwidth():
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), min_ms=50)
    return 2 * a.numel() / t / 1e6


def benchmark(lib, res, out_md, quick=False, dtypes=None):
    dev_name = torch.cuda.get_device_name()
    lib.use_workspace = True  # as the TensorFlow op runs them
    rng = np.random.default_rng(7)
    # Ceilings measured now: device-to-device copy (bytes read + written), dense bf16 GEMM.
    hbm = copy_bandwidth()
    print(f"device: {dev_name}; copy bandwidth {hbm:.0f} GB/s", flush=True)

    configs = []
    densities = [0.02, 0.05, 0.10, 0.25, 0.50, 1.00]
    for dt in ("bfloat16", "float16", "float32"):
        for N in (64, 4096):
            for bs in (16, 32, 64):
                configs.append((dt, N, 4096, bs, 1))
    for bs in (16, 32, 64):
        configs.append(("bfloat16", 16384, 8192, bs, 1))
    for bs in (16, 32, 64):  # feature_axis 0: x (C, N), y (K, N)
        configs.append(("bfloat16", 4096, 4096, bs, 0))
    if quick:
        configs = [c for c in configs if c[0] == "bfloat16" and c[2] == 4096 and c[3] != 16]
        densities = [0.05, 0.25]
    if dtypes:
        configs = [c for c in configs if c[0] in dtypes]

    rows = []
    dense_cache = {}
    for (dt, N, CK, bs, fa) in configs:
        tdt = DTYPES[dt][1]
        C = K = CK
        x = torch.randn(*((N, C) if fa else (C, N)), device="cuda").to(tdt)
        dy = torch.randn(*((N, K) if fa else (K, N)), device="cuda").to(tdt)
        key = (dt, N, CK)
        if key not in dense_cache:
            Wd = torch.randn(C, K, device="cuda").to(tdt)
            yd = torch.empty(N, K, dtype=tdt, device="cuda")
            Gd = torch.empty(C, K, dtype=tdt, device="cuda")
            xd = x if fa else x.t().contiguous()
            dyd = dy if fa else dy.t().contiguous()
            tf = bench(lambda: torch.matmul(xd, Wd, out=yd))
            tg = bench(lambda: torch.matmul(xd.t(), dyd, out=Gd))
            del xd, dyd
            dense_cache[key] = (tf, tg)
            del Wd, yd, Gd
        tdf, tdg = dense_cache[key]
        dense_tflops = 2 * N * C * K / tdf / 1e9
        for d in densities:
            L = exact_layout(C // bs, K // bs, bs, d, rng)
            dens = L.blocks / (L.CB * L.KB)
            w = torch.randn(L.blocks, bs, bs, device="cuda").to(tdt)
            # NaN first, as in the checks: the allocator hands back the last density's buffers.
            y = torch.full((N, K) if fa else (K, N), float("nan"), dtype=tdt, device="cuda")
            dw = torch.full((L.blocks, bs, bs), float("nan"), dtype=tdt, device="cuda")
            rc = lib.forward(dt, x, w, y, N, fa, L)
            rc2 = lib.grad_w(dt, x, dy, dw, N, fa, L)
            torch.cuda.synchronize()
            if rc or rc2:
                res.check(False, f"bench launch {dt} N={N} bs={bs} d={d}: {rc} {rc2}")
                continue
            # spot check against the dense product
            Wm = L.dense(w)
            ref = x.double() @ Wm.double() if fa else Wm.t().double() @ x.double()
            e = rel_err(y, ref)
            res.check(e <= TOL[dt], f"bench spot check {dt} N={N} bs={bs} d={d} relerr={e:.3g}")
            Gref = L.gather(x.double().t() @ dy.double() if fa else x.double() @ dy.double().t())
            e = rel_err(dw, Gref)
            del Gref
            res.check(e <= TOL[dt], f"bench dW spot check {dt} N={N} bs={bs} d={d} relerr={e:.3g}")
            tf = bench(lambda: lib.forward(dt, x, w, y, N, fa, L))
            tg = bench(lambda: lib.grad_w(dt, x, dy, dw, N, fa, L))
            # The mma.sync forward and dW (SetTuning(3)) where wgmma or the small-batch dW is
            # the default: Hopper, 16-bit.  The alternative tiles of SetTuning(1), (2) are mma.sync
            # tiles: they must equal its result bit for bit (at these batch sizes no tile is
            # split over a cluster, which would change the order of the sums).
            tm = tw = tw2 = tgm = float("nan")
            y_mma = y
            if dt != "float32" and is_hopper():
                lib.set_tuning(3)
                y_mma = torch.full_like(y, float("nan"))
                rc3 = lib.forward(dt, x, w, y_mma, N, fa, L)
                torch.cuda.synchronize()
                e3 = rel_err(y_mma, ref) if rc3 == 0 else float("inf")
                res.check(e3 <= TOL[dt], f"tuning-3 spot check {dt} N={N} bs={bs} d={d} "
                          f"relerr={e3:.3g}")
                tm = bench(lambda: lib.forward(dt, x, w, y_mma, N, fa, L))
                tgm = bench(lambda: lib.grad_w(dt, x, dy, dw, N, fa, L))  # the mma.sync dW
                lib.set_tuning(0)
            elif N <= 64 and bs <= 32 and is_hopper():
                # The mma.sync dW where the float32 small-batch dW is the default (from 6
                # blocks per column; below that both settings run the same tiles).
                lib.set_tuning(3)
                tgm = bench(lambda: lib.grad_w(dt, x, dy, dw, N, fa, L))
                lib.set_tuning(0)
            del ref
            # The narrow wgmma forwards (16-bit: bs 16 / 32 with N > 64, every bs with
            # N <= 64, bs 64 from 512 rows) with cp.async copies (SetTuning(6)) where the copy
            # engine is the default: the same sums, bit for bit.
            fwd = lambda out: lib.forward(dt, x, w, out, N, fa, L)
            tc = float("nan")
            if dt != "float32" and is_hopper() and (N <= 64 or bs <= 32 or N >= 512):
                tc = time_variant(lib, res, 6, fwd, y, y, f"tuning-6 forward equals the default "
                                  f"{dt} N={N} bs={bs} d={d}")
            if dt != "float32" and bs >= 32 and N > 64:
                tw = time_variant(lib, res, 1, fwd, y, y_mma, f"tuning-1 forward equals mma.sync "
                                  f"default {dt} N={N} bs={bs} d={d}")
                if bs == 64:
                    tw2 = time_variant(lib, res, 2, fwd, y, y_mma, f"tuning-2 forward equals "
                                       f"mma.sync default {dt} N={N} bs={bs} d={d}")
            # PyTorch BSR: y^T = (W^T as BSR) @ x^T, the same work.
            tb = float("nan")
            try:
                Wt = Wm.t().contiguous().to_sparse_bsr((bs, bs))
                xt = x.t().contiguous() if fa else x
                torch.cuda.synchronize()
                tb = bench(lambda: Wt @ xt, max_reps=20, min_reps=3)
                del Wt, xt
            except Exception as ex:  # some dtypes / sizes are unsupported
                print(f"BSR failed for {dt} N={N} bs={bs} d={d}: {type(ex).__name__}: "
                      f"{str(ex)[:120]}", flush=True)
            del Wm
            eff = 2 * N * C * K * dens / tf / 1e9
            effg = 2 * N * C * K * dens / tg / 1e9
            wbytes = L.blocks * bs * bs * x.element_size()
            row = dict(dt=dt, fa=fa, N=N, CK=CK, bs=bs, d=dens, tf=tf, eff=eff, dense_tf=tdf,
                       dense_tflops=dense_tflops, speed=tdf / tf, frac=eff / dense_tflops,
                       bsr=tb, vs_bsr=tb / tf, tm=tm, tgm=tgm, tw=tw, tw2=tw2, tc=tc, tg=tg,
                       effg=effg, dense_tg=tdg,
                       speed_g=tdg / tg, g_over_f=tg / tf,
                       wbw=wbytes / tf / 1e6, wbw_frac=wbytes / tf / 1e6 / hbm)
            rows.append(row)
            print(fmt_row(row), flush=True)
            del w, y, dw
        del x, dy
    # Table.
    lines = [f"Device: {dev_name}; measured copy bandwidth {hbm:.0f} GB/s (read+write); "
             f"date {datetime.date.today().isoformat()}; torch {torch.__version__}.",
             "",
             "Forward and dW; fa = feature_axis (1: x (N, C), y (N, K); 0: x (C, N), y (K, N)); "
             "C = K; times are medians "
             "of CUDA-event timings with the L2 flushed before each run.  eff TFLOP/s = "
             "2*N*C*K*density/time; 'frac' = eff / dense TFLOP/s (same dtype); 'x dense' = "
             "dense time / our time; 'x BSR' = PyTorch BSR time / our time; 'W GB/s' = weight "
             "bytes / forward time (with % of copy bandwidth); 'mma.sync' = the 16-bit forward "
             "without wgmma (SetTuning(3), what pre-Hopper GPUs run; the same kernel where "
             "wgmma is not the default); 'dW ms, mma.sync' likewise for dW, and with N <= 64 "
             "the mma.sync dW tiles where the small-batch dW is the default; "
             "'tuning 1/2' = the mma.sync forward with alternative tile configurations "
             "(SetTuning); 'fwd ms, cp.async' = the narrow wgmma forwards with cp.async "
             "copies (SetTuning(6)) where they copy on the copy engine by default; "
             "in these five columns x = that column's time / the default's.",
             "",
             "| dtype | fa | N | C=K | bs | density | fwd ms | eff TFLOP/s | frac | x dense | "
             "x BSR | dW ms | dW x dense | dW/fwd | W GB/s | fwd ms, mma.sync | dW ms, mma.sync | "
             "fwd ms, tuning 1 | fwd ms, tuning 2 | fwd ms, cp.async |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dt']} | {r['fa']} | {r['N']} | {r['CK']} | {r['bs']} | {r['d']*100:.0f}% | "
            f"{r['tf']:.4f} | {r['eff']:.1f} | {r['frac']*100:.0f}% | {r['speed']:.2f} | "
            f"{r['vs_bsr']:.2f} | {r['tg']:.4f} | {r['speed_g']:.2f} | {r['g_over_f']:.2f} | "
            f"{r['wbw']:.0f} ({r['wbw_frac']*100:.0f}%) | "
            + " | ".join(against_default(r[k], r[base])
                         for k, base in (("tm", "tf"), ("tgm", "tg"), ("tw", "tf"), ("tw2", "tf"),
                                         ("tc", "tf")))
            + " |")
    lines.append("")
    lines.append("Dense references (ms, TFLOP/s): " + "; ".join(
        f"{k[0]} N={k[1]} C=K={k[2]}: fwd {v[0]:.4f} ({2*k[1]*k[2]*k[2]/v[0]/1e9:.0f}), "
        f"dW {v[1]:.4f}" for k, v in dense_cache.items()))
    md = "\n".join(lines) + "\n"
    if out_md:
        with open(out_md, "w") as f:
            f.write(md)
        try:
            plot(rows, os.path.join(os.path.dirname(out_md), "benchmark_gpu_speedup.png"),
                 dev_name)
        except Exception as ex:  # plotting is optional
            print(f"plot skipped: {type(ex).__name__}: {ex}")
    return md


def bench_transpose(lib, res):
    """Table: the forward reading w transposed (LaunchForwardTransposedW, the input gradient's
    product) against the forward, at N = 64 and 4096, and what a transposed copy of the blocks
    would add (PyTorch's); C = K = 4096, feature axis 1."""
    rng = np.random.default_rng(3)
    lines = [f"tuning {lib.tuning}",
             "| dtype | bs | density | forward, N = 64 us | reading w transposed, N = 64 us | "
             "forward, N = 4096 us | reading w transposed, N = 4096 us | "
             "PyTorch w.transpose(1, 2) copy us |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for dt in ("bfloat16", "float32"):
        for bs in (8, 16, 32, 64):
            for density in (0.1, 0.5):
                L = random_layout(4096 // bs, 4096 // bs, bs, density, rng)
                LT = L.transposed()
                tdt = DTYPES[dt][1]
                w = torch.randn(L.blocks, bs, bs, device="cuda").to(tdt)
                w_t = torch.empty_like(w)
                times = []
                for N in (64, 4096):
                    x = torch.randn(N, 4096, device="cuda").to(tdt)
                    y = torch.empty(N, 4096, device="cuda").to(tdt)
                    times.append(bench(lambda: lib.forward(dt, x, w, y, N, 1, L)))
                    times.append(bench(lambda: lib.forward_transposed_w(dt, x, w, y, N, 1, LT)))
                times.append(bench(lambda: w_t.copy_(w.transpose(1, 2))))
                lines.append(f"| {dt} | {bs} | {density:.0%} | " +
                             " | ".join(f"{t * 1e3:.1f}" for t in times) + " |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def time_variant(lib, res, tuning, call, like, expected, what):
    """Benchmark time (ms) of call(out) under SetTuning(tuning), after checking that its output
    equals `expected` bit for bit; the default setting is restored."""
    lib.set_tuning(tuning)
    out = torch.full_like(like, float("nan"))
    rc = call(out)
    torch.cuda.synchronize()
    res.check(rc == 0 and same_bits(out, expected), what)
    t = bench(lambda: call(out))
    lib.set_tuning(0)
    return t


def against_default(t, default):
    """A table cell for an alternative kernel's time t (ms): empty where it was not timed (NaN),
    else the time and its ratio to the default's."""
    return "" if math.isnan(t) else f"{t:.4f} (x{t / default:.2f})"


def plot(rows, path, dev_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("bfloat16", 4096, 4096), ("bfloat16", 16384, 8192), ("float32", 4096, 4096),
              ("bfloat16", 64, 4096)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (dt, N, CK) in zip(axes, panels):
        for bs, col in ((16, "tab:blue"), (32, "tab:orange"), (64, "tab:green")):
            rs = [r for r in rows if r["dt"] == dt and r["N"] == N and r["CK"] == CK
                  and r["bs"] == bs and r["fa"] == 1]
            if not rs:
                continue
            d = [r["d"] * 100 for r in rs]
            ax.plot(d, [r["speed"] for r in rs], "o-", color=col, label=f"ours bs {bs}")
            ax.plot(d, [r["bsr"] and r["dense_tf"] / r["bsr"] for r in rs], "x--", color=col,
                    alpha=0.6, label=f"torch BSR bs {bs}")
        dd = [2, 5, 10, 25, 50, 100]
        ax.plot(dd, [100 / x for x in dd], ":", color="gray", label="1/density")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (%)")
        ax.set_ylabel("forward speedup vs dense cuBLAS")
        ax.set_title(f"{dt}, N={N}, C=K={CK}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Block-sparse forward vs dense, {dev_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


def fmt_row(r):
    return (f"{r['dt']:8s} fa={r['fa']} N={r['N']:5d} C=K={r['CK']} bs={r['bs']:2d} d={r['d']*100:5.1f}% "
            f"fwd {r['tf']:.4f} ms eff {r['eff']:6.1f} TF/s ({r['frac']*100:3.0f}% dense) "
            f"x{r['speed']:.2f} dense, x{r['vs_bsr']:.2f} BSR | dW {r['tg']:.4f} ms "
            f"x{r['speed_g']:.2f} dense, dW/fwd {r['g_over_f']:.2f} | W {r['wbw']:.0f} GB/s | mma.sync {r['tm']:.4f} "
            f"dW {r['tgm']:.4f} | cp.async {r['tc']:.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "libbsmm_gpu.so"))
    ap.add_argument("--correctness", action="store_true")
    ap.add_argument("--check", action="store_true", help="small subset for compute-sanitizer")
    ap.add_argument("--race", action="store_true", help="tiny subset for racecheck")
    ap.add_argument("--transposed", action="store_true",
                    help="only the transposed-batch checks (with --race: their racecheck subset)")
    ap.add_argument("--grouped", action="store_true",
                    help="only the checks of the bs-32 forward over groups of block columns "
                         "(with --check: their quick subset)")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bench-transpose", action="store_true",
                    help="time the forward reading w's blocks transposed (the input gradient)")
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--dtypes", default=None,
                    help="comma-separated dtypes the benchmark times (default: all)")
    ap.add_argument("--tuning", type=int, default=0,
                    help="tile-configuration variant (SetTuning) for the checks")
    args = ap.parse_args()
    lib = Lib(args.lib)
    res = Results()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}", flush=True)
    lib.set_tuning(args.tuning)
    if args.transposed:
        res.check(torch.cuda.get_device_capability()[0] == 9 and args.tuning == 0,
                  "--transposed needs a Hopper GPU (wgmma) and --tuning 0")
        rng = np.random.default_rng(1234)
        gen = torch.Generator(device="cuda")
        gen.manual_seed(1234)
        transposed_batch_checks(lib, res, gen, rng, quick=args.check, race=args.race)
    elif args.grouped:
        res.check(is_hopper() and args.tuning == 0, "--grouped needs a Hopper GPU and --tuning 0")
        rng = np.random.default_rng(1234)
        gen = torch.Generator(device="cuda")
        gen.manual_seed(1234)
        grouped_checks(lib, res, gen, rng, quick=args.check)
    elif args.check:
        correctness(lib, res, quick=True)
    if args.race and not (args.transposed or args.grouped):
        correctness(lib, res, race=True)
    if args.correctness and not (args.transposed or args.grouped):
        correctness(lib, res, quick=args.quick)
    print(f"checks: {res.passed} passed, {len(res.failed)} failed", flush=True)
    if args.bench_transpose:
        bench_transpose(lib, res)
    if args.bench:
        md = benchmark(lib, res, args.out_md, quick=args.quick,
                       dtypes=args.dtypes.split(",") if args.dtypes else None)
        print(md)
        print(f"checks incl. benchmark spot checks: {res.passed} passed, {len(res.failed)} failed")
    if res.failed:
        print("FAILED:\n  " + "\n  ".join(res.failed[:50]))
        sys.exit(1)


if __name__ == "__main__":
    main()
