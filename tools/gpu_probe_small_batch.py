#!/usr/bin/env python3
"""What a small-batch forward's fixed cost is made of: a cold launch and dependent loads.

Times, as tools/gpu_check.py's benchmark does (median of CUDA-event timings, L2 flushed before
every run), four trivial kernels of 132 CTAs: an empty one, then one, two and three dependent
global loads per CTA (each load's address comes from the one before, as the forward's first
copies wait on its column's list bounds, then on its block indices); the same with the first
address read from the kernel's parameters instead (a table of 1 KiB or 16 KiB passed by value,
as the launch could pass the columns' list heads); then the 16-bit forward
with N = 64, C = K = 4096, on random layouts, and dense cuBLAS on the same shape, with the
weights' bytes over the time.

    python3 tools/gpu_probe_small_batch.py     # after: bash tools/gpu_check.sh build
Needs a CUDA GPU, PyTorch and CuPy (for the trivial kernels); no TensorFlow.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import ROOT, Lib, bench, copy_bandwidth, exact_layout  # noqa: E402

CHAINS = r'''
extern "C" __global__ void loads0(const int* a, const int* b, const int* c, int* out) {}
extern "C" __global__ void loads1(const int* a, const int* b, const int* c, int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = __ldg(a + blockIdx.x);
}
extern "C" __global__ void loads2(const int* a, const int* b, const int* c, int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = __ldg(b + __ldg(a + blockIdx.x));
}
extern "C" __global__ void loads3(const int* a, const int* b, const int* c, int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = __ldg(c + __ldg(b + __ldg(a + blockIdx.x)));
}
'''

# The first index read from the kernel's parameters: a by-value table of kWords ints, read at
# a different 64-byte line per CTA.
PARAM_CHAINS = r'''
template <int kWords> struct Table { int v[kWords]; };
template <int kWords>
__global__ void params1(const __grid_constant__ Table<kWords> t, const int* a, int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = t.v[(blockIdx.x * 16) % kWords];
}
template <int kWords>
__global__ void params2(const __grid_constant__ Table<kWords> t, const int* a, int* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = __ldg(a + t.v[(blockIdx.x * 16) % kWords]);
}
'''


def time_load_chains(ctas=132):
    """us per launch of the trivial kernels, by number of dependent loads."""
    import cupy as cp
    module = cp.RawModule(code=CHAINS)
    n = 1 << 20
    index = np.arange(n, dtype=np.int64)
    # Permutations of [0, n): every load lands in another line, far from the last one.
    a, b, c = (cp.asarray((index * m + k) % n, dtype=cp.int32) for m, k in
               ((37, 0), (101, 7), (13, 3)))
    out = cp.zeros(ctas, dtype=cp.int32)
    times = {}
    for loads in range(4):
        kernel = module.get_function(f"loads{loads}")
        times[loads] = 1e3 * bench(lambda: kernel((ctas,), (128,), (a, b, c, out)), min_ms=30)
    return times


def time_param_chains(ctas=132):
    """us per launch, by parameter table size (bytes) and global loads after the table's read."""
    import cupy as cp
    names = [f"params{loads}<{words}>" for words in (256, 4096) for loads in (1, 2)]
    module = cp.RawModule(code=PARAM_CHAINS, options=("-std=c++17",), name_expressions=names)
    n = 1 << 20
    a = cp.asarray((np.arange(n, dtype=np.int64) * 37) % n, dtype=cp.int32)
    out = cp.zeros(ctas, dtype=cp.int32)
    times = {}
    for words in (256, 4096):
        table = np.zeros((), dtype=np.dtype([("v", np.int32, (words,))]))
        table["v"] = (np.arange(words, dtype=np.int64) * 101 + 7) % n
        for loads in (1, 2):
            kernel = module.get_function(f"params{loads}<{words}>")
            args = (table[()], a, out)
            times[(4 * words, loads)] = 1e3 * bench(
                lambda: kernel((ctas,), (128,), args), min_ms=30)
    return times


def time_forwards(lib, dtype="bfloat16", N=64, C=4096):
    """(bs, density, us, weight bytes) of the forward on random layouts, and dense cuBLAS."""
    rows = []
    torch_dtype = getattr(torch, dtype)
    for bs in (64, 32):
        for density in (0.02, 0.10, 1.0):
            layout = exact_layout(C // bs, C // bs, bs, density, np.random.default_rng(1))
            x = torch.randn(N, C, device="cuda").to(torch_dtype)
            w = torch.randn(layout.blocks, bs, bs, device="cuda").to(torch_dtype)
            y = torch.empty(N, C, device="cuda", dtype=torch_dtype)
            rc = lib.forward(dtype, x, w, y, N, 1, layout)
            if rc != 0:
                raise RuntimeError(f"forward failed: {lib.err(rc)}")
            t = bench(lambda: lib.forward(dtype, x, w, y, N, 1, layout), min_ms=30)
            rows.append((f"bs {bs}, {density:.0%}", 1e3 * t, w.numel() * w.element_size()))
    x = torch.randn(N, C, device="cuda").to(torch_dtype)
    W = torch.randn(C, C, device="cuda").to(torch_dtype)
    rows.append(("dense cuBLAS", 1e3 * bench(lambda: torch.matmul(x, W), min_ms=30),
                 W.numel() * W.element_size()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "libbsmm_gpu.so"))
    args = ap.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name()}")
    chains = time_load_chains()
    print("\n| dependent loads per CTA (132 CTAs) | us | over the empty kernel |")
    print("|---|---|---|")
    for loads, t in chains.items():
        print(f"| {loads} | {t:.2f} | {t - chains[0]:+.2f} |")
    try:
        params = time_param_chains()
    except Exception as e:  # noqa: BLE001 - the table is optional; say why it is missing
        print(f"\n(parameter tables not timed: {type(e).__name__}: {e})")
    else:
        print("\n| first index from a parameter table of | then global loads | us "
              "| over the empty kernel |")
        print("|---|---|---|---|")
        for (nbytes, loads), t in params.items():
            print(f"| {nbytes} bytes | {loads - 1} | {t:.2f} | {t - chains[0]:+.2f} |")
    lib = Lib(args.lib)
    lib.use_workspace = True  # as the TensorFlow op runs them
    hbm = copy_bandwidth()
    print(f"\ncopy bandwidth (bytes read + written, as tools/gpu_check.py's table): {hbm:.0f} GB/s")
    print("\n| bf16 forward, N = 64, C = K = 4096 | us | weights MB | weights GB/s | of copy bw |")
    print("|---|---|---|---|---|")
    for name, t, nbytes in time_forwards(lib):
        rate = nbytes / 1e3 / t
        print(f"| {name} | {t:.2f} | {nbytes / 1e6:.1f} | {rate:.0f} | {rate / hbm:.0%} |")


if __name__ == "__main__":
    main()
