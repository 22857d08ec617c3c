"""Argument checks shared by the layers: each raises a ValueError that names the argument."""

import numpy as np

from blocksparse_tf.matmul import check_block_size


def positive_int(value, name):
    """``value`` as a Python int, if it is an integer >= 1 (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def flag(value, name):
    """``value`` as a bool, if it is one (a string such as "False" is truthy: refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def width_in_blocks(width, block_size, name="units"):
    """(width, block_size) as ints, if block_size is supported and divides width."""
    block_size = check_block_size(block_size)
    width = positive_int(width, name)
    if width % block_size:
        raise ValueError(f"{name}={width} must be a multiple of block_size={block_size}")
    return width, block_size
