"""Checks that float16 / bfloat16 products accumulate in float32.

A product of half-precision inputs accumulated in float32 and rounded once to the half type
lies, element by element, within a bound of the exact sum that half-precision accumulation
misses by far: so a test can tell the two apart, where a relative tolerance on the whole
output (1e-2 for bfloat16) passed either.
"""

import numpy as np
import tensorflow as tf

import blocksparse_tf

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def float32_accumulation_bound(exact, abs_sum, terms, np_dtype):
    """Largest |result - exact| of sums accumulated in float32 and rounded once to np_dtype.

    exact: the float64 sums of the products of the (half-precision) inputs; abs_sum: the sums
    of the products' magnitudes; terms: how many products each sum adds (at most).  The
    products of two half-precision numbers are exact in float32; adding `terms` of them in
    float32, in any order, is off by at most about terms x 2^-24 x abs_sum (with a margin for
    the higher-order terms); the rounding to np_dtype then adds half a unit in its last place.
    """
    exact = np.asarray(exact, np.float64)
    float32_error = 1.01 * terms * FLOAT32_UNIT_ROUNDOFF * np.asarray(abs_sum, np.float64)
    # A finite result at the top of np_dtype's range is off by at most half the spacing of its
    # largest value (past it, the rounding gives infinity, which no finite result is).
    top = float(tf.as_dtype(np_dtype).max)
    largest = np.minimum(np.abs(exact) + float32_error, top).astype(np_dtype)
    return float32_error + 0.5 * np.spacing(largest).astype(np.float64)


def within_float32_accumulation(actual, exact, abs_sum, terms, np_dtype):
    """Whether every element of `actual` is within float32_accumulation_bound of `exact`."""
    error = np.abs(np.asarray(actual, np.float64) - np.asarray(exact, np.float64))
    return bool(np.all(error <= float32_accumulation_bound(exact, abs_sum, terms, np_dtype)))


def product_and_bound_inputs(a, b):
    """a @ b in float64 (the exact sums for half-precision inputs of moderate length) and
    |a| @ |b|, for float32_accumulation_bound."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a @ b, np.abs(a) @ np.abs(b)


def matmul_summed_in(np_dtype, a, b):
    """a @ b summed term by term with every partial sum rounded to np_dtype: what
    accumulating in half precision gives (the negative control of the checks above)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    total = np.zeros((a.shape[0], b.shape[1]), np_dtype)
    for k in range(a.shape[1]):
        total = (total.astype(np.float32) + a[:, k:k + 1] * b[k:k + 1, :]).astype(np_dtype)
    return total


def amx_serves(dtype, bs):
    """Whether this product runs on AMX tiles here (ops/blocksparse_matmul_amx.h): bfloat16,
    bs 16, 32 or 64 (either feature axis), on a processor with AMX."""
    return dtype == tf.bfloat16 and bs in (16, 32, 64) and blocksparse_tf.cpu_isa() == "amx"
