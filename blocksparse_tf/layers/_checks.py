"""Argument checks shared by the layers: each raises a ValueError that names the argument."""

from blocksparse_tf.layouts import _check_bool
from blocksparse_tf.matmul import check_block_size, is_integer


def positive_int(value, name):
    """``value`` as a Python int, if it is an integer >= 1 (bools are not integers here)."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def pair_of_positive_ints(value, name):
    """An int or a pair of ints (kernel sizes, strides), all >= 1, as a tuple of two Python
    ints; the ValueError names the value as given."""
    pair = (value, value) if is_integer(value) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or
            not all(is_integer(v) and v >= 1 for v in pair)):
        raise ValueError(f"{name} must be a positive integer or a pair of them; got {value!r}")
    return tuple(int(v) for v in pair)


def flag(value, name):
    """``value`` as a bool, if it is one (a string such as "False" is truthy: refused)."""
    return _check_bool(name, value)


def optional_int(value, name):
    """``value`` as a Python int, or None; bools refused."""
    if value is not None and not is_integer(value):
        raise ValueError(f"{name} must be an integer or None; got {value!r}")
    return None if value is None else int(value)


def width_in_blocks(width, block_size, name="units"):
    """(width, block_size) as ints, if block_size is supported and divides width."""
    block_size = check_block_size(block_size)
    width = positive_int(width, name)
    if width % block_size:
        raise ValueError(f"{name}={width} must be a multiple of block_size={block_size}")
    return width, block_size
