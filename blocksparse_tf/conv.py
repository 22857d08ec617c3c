"""Block-sparse 2-D convolution ops (CPU, NHWC) and their gradients.

The kernel W (kh, kw, C, K) has one block-sparse channel layout at every tap and is stored as
``w`` (blocks, kh, kw, bs, bs): ``w[b, i, j]`` is block b of tap (i, j), block b sitting at
``layout[b] = (c, k)``.  The ops compute the convolution as an implicit GEMM: every output
pixel tile sums (input pixel rows shifted by each tap) . (the tap's block) in registers, reading
the input in place, so neither the forward pass nor the gradients build a patch tensor, and
the work and the parameters are proportional to the stored blocks.  Padding is explicit,
``(top, bottom, left, right)``; :func:`conv_padding` gives the amounts of SAME and VALID.

The kernels are CPU only; ``blocksparse_tf.layers.BlockSparseConv2D`` falls back to an im2col
and ``BlocksparseMatMul`` elsewhere.  Results are bitwise deterministic.
"""

import numpy as np
import tensorflow as tf

from blocksparse_tf._ops import ops
from blocksparse_tf.matmul import (check_block_size, check_float_dtype, coords_tensor,
                                   int32_tensor, is_integer)


def conv_padding(size, kernel, stride, dilation, padding):
    """(before, after) padding of one spatial dimension as tf.nn.conv2d pads it.

    ``padding`` is "same" or "valid" (either case); SAME puts the odd extra row or column
    after.  ``size`` is an integer >= 0 (the amounts are then ints), or a scalar integer tensor
    (then the amounts are tensors of its dtype, computed in int64: int32 sums near 2^31 would
    wrap).  ``kernel``, ``stride`` and ``dilation`` are integers >= 1.
    """
    padding = _padding_name(padding)
    kernel, stride, dilation = _int_list((kernel, stride, dilation), 3, 1,
                                         "kernel, stride and dilation")
    if not tf.is_tensor(size) and not (is_integer(size) and size >= 0):
        raise ValueError(f"size must be an integer >= 0 or an integer tensor; got {size!r}")
    if tf.is_tensor(size) and not size.dtype.is_integer:
        raise ValueError(f"size must be an integer tensor; got dtype {size.dtype.name}")
    if padding == "valid":
        return 0, 0
    effective = (kernel - 1) * dilation + 1
    # A numpy integer's sums could wrap, and so could an int32 tensor's: Python ints, int64.
    wide = tf.cast(size, tf.int64) if tf.is_tensor(size) else int(size)
    total = ((wide + stride - 1) // stride - 1) * stride + effective - wide
    if not tf.is_tensor(size):
        total = max(total, 0)
        return total // 2, total - total // 2
    total = tf.maximum(total, 0)
    return tf.cast(total // 2, size.dtype), tf.cast(total - total // 2, size.dtype)


def _padding_name(padding):
    """'same' or 'valid' from either case; ValueError otherwise."""
    name = padding.lower() if isinstance(padding, str) else None
    if name not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid'; got {padding!r}")
    return name


#: Largest stride, dilation, padding amount and kernel size the ops take (as their kernels).
MAX_SPATIAL = 2**31 - 1


def _int_list(values, length, least, what):
    items = list(values) if isinstance(values, (tuple, list, np.ndarray)) else None
    if (items is None or len(items) != length or
            not all(is_integer(v) and least <= v <= MAX_SPATIAL for v in items)):
        raise ValueError(f"{what} must be {length} integers in [{least}, {MAX_SPATIAL}]; "
                         f"got {items if items is not None else values!r}")
    return [int(v) for v in items]


def _check_attrs(block_size, C, K, strides, dilations, padding):
    check_block_size(block_size)
    for name, value in (("C", C), ("K", K)):
        if not is_integer(value) or value < 1 or value % block_size:
            raise ValueError(f"{name} must be a positive multiple of block_size={block_size}; "
                             f"got {value!r}")
    return dict(block_size=int(block_size), C=int(C), K=int(K),
                strides=_int_list(strides, 2, 1, "strides"),
                dilations=_int_list(dilations, 2, 1, "dilations"),
                padding=_int_list(padding, 4, 0, "padding (top, bottom, left, right)"))


def _check_image(t, name, channels):
    check_float_dtype(t.dtype, name)
    if t.shape.rank is not None and (t.shape.rank != 4 or t.shape[-1] not in (None, channels)):
        raise ValueError(f"{name} must have shape (batch, height, width, {channels}); "
                         f"got {t.shape}")


def _check_layout(layout):
    layout = coords_tensor(layout)
    if layout.shape.rank is not None and (layout.shape.rank != 2 or layout.shape[1] not in (None, 2)):
        raise ValueError(f"layout must have shape (blocks, 2); got {layout.shape}")
    return layout


def _check_kernel(w, x, layout, block_size):
    if w.dtype != x.dtype:
        raise ValueError(f"w dtype {w.dtype.name} does not match the images' dtype {x.dtype.name}")
    expected = [layout.shape[0], None, None, block_size, block_size]
    if w.shape.rank is not None and (w.shape.rank != 5 or
                                     not w.shape.is_compatible_with(expected)):
        raise ValueError(f"w must have shape (blocks={layout.shape[0]}, kh, kw, {block_size}, "
                         f"{block_size}); got {w.shape}")


def blocksparse_conv2d(x, w, layout, block_size, C, K, strides=(1, 1), dilations=(1, 1),
                       padding=(0, 0, 0, 0)):
    """y (N, Ho, Wo, K) = the convolution of x (N, H, W, C) with the block-sparse kernel w."""
    attrs = _check_attrs(block_size, C, K, strides, dilations, padding)
    x, w = tf.convert_to_tensor(x), tf.convert_to_tensor(w)
    layout = _check_layout(layout)
    _check_image(x, "x", attrs["C"])
    _check_kernel(w, x, layout, attrs["block_size"])
    return ops().blocksparse_conv2d(x, w, layout, **attrs)


def blocksparse_conv2d_grad_input(input_sizes, w, dy, layout, block_size, C, K, strides=(1, 1),
                                  dilations=(1, 1), padding=(0, 0, 0, 0)):
    """dx of shape ``input_sizes`` (N, H, W, C) for the output gradient dy (N, Ho, Wo, K)."""
    attrs = _check_attrs(block_size, C, K, strides, dilations, padding)
    w, dy = tf.convert_to_tensor(w), tf.convert_to_tensor(dy)
    layout = _check_layout(layout)
    _check_image(dy, "dy", attrs["K"])
    _check_kernel(w, dy, layout, attrs["block_size"])
    return ops().blocksparse_conv2d_grad_input(int32_tensor(input_sizes, "input_sizes"), w, dy,
                                               layout, **attrs)


def _check_kernel_size(kernel_size):
    """(kh, kw) as an int32 tensor, from two ints, a TensorShape such as w.shape[1:3] (known
    then), or an integer tensor such as tf.shape(w)[1:3]."""
    if isinstance(kernel_size, tf.TensorShape) and kernel_size.is_fully_defined():
        kernel_size = kernel_size.as_list()
    if tf.is_tensor(kernel_size):
        if not kernel_size.dtype.is_integer or not kernel_size.shape.is_compatible_with([2]):
            raise ValueError(f"kernel_size must be a vector of 2 integers; got {kernel_size!r}")
        return int32_tensor(kernel_size, "kernel_size")
    return tf.constant(_int_list(kernel_size, 2, 1, "kernel_size"), tf.int32)


def blocksparse_conv2d_grad_kernel(x, dy, layout, kernel_size, block_size, C, K, strides=(1, 1),
                                   dilations=(1, 1), padding=(0, 0, 0, 0)):
    """dw (blocks, kh, kw, bs, bs): the kernel gradient at the stored blocks only.

    ``kernel_size`` (kh, kw) is two ints or an integer tensor (it may be unknown until run
    time; dw's static shape then has unknown kh and kw).
    """
    attrs = _check_attrs(block_size, C, K, strides, dilations, padding)
    x, dy = tf.convert_to_tensor(x), tf.convert_to_tensor(dy)
    layout = _check_layout(layout)
    _check_image(x, "x", attrs["C"])
    _check_image(dy, "dy", attrs["K"])
    if dy.dtype != x.dtype:
        raise ValueError(f"dy dtype {dy.dtype.name} does not match x dtype {x.dtype.name}")
    return ops().blocksparse_conv2d_grad_kernel(x, dy, layout, _check_kernel_size(kernel_size),
                                                **attrs)


def _attrs(op):
    return {name: op.get_attr(name)
            for name in ("block_size", "C", "K", "strides", "dilations", "padding")}


def _kernel_size(w):
    # Read at run time, so the gradients work when w's shape is unknown while tracing; the
    # shape function still sees the size when it is known then.
    return tf.shape(w, out_type=tf.int32)[1:3]


@tf.RegisterGradient("BlocksparseConv2D")
def _blocksparse_conv2d_grad(op, dy):
    x, w, layout = op.inputs
    a = _attrs(op)
    dx = ops().blocksparse_conv2d_grad_input(tf.shape(x), w, dy, layout, **a)
    dw = ops().blocksparse_conv2d_grad_kernel(x, dy, layout, _kernel_size(w), **a)
    return dx, dw, None


# Both gradients are bilinear in their operands, so their own gradients are the three ops again.
@tf.RegisterGradient("BlocksparseConv2DGradInput")
def _blocksparse_conv2d_grad_input_grad(op, ddx):
    _, w, dy, layout = op.inputs
    a = _attrs(op)
    dw = ops().blocksparse_conv2d_grad_kernel(ddx, dy, layout, _kernel_size(w), **a)
    ddy = ops().blocksparse_conv2d(ddx, w, layout, **a)
    return None, dw, ddy, None


@tf.RegisterGradient("BlocksparseConv2DGradKernel")
def _blocksparse_conv2d_grad_kernel_grad(op, ddw):
    x, dy, layout, _ = op.inputs
    a = _attrs(op)
    dx = ops().blocksparse_conv2d_grad_input(tf.shape(x), ddw, dy, layout, **a)
    ddy = ops().blocksparse_conv2d(x, ddw, layout, **a)
    return dx, ddy, None, None
