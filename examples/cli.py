"""Argument types shared by the example scripts (argparse ``type=`` callables).

Each converts the text and refuses values out of range with a message naming both, which
argparse prints after the option's name (``argument --batch: must be >= 1; got 0``).
"""
import argparse


def number(convert, ok, what):
    """A type: ``convert(text)`` (int or float), refused unless ``ok(value)``; ``what`` names
    the range (``">= 1"``, ``"in (0, 1]"``)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {convert.__name__} value: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}; got {text}")
        return value
    return parse


positive_int = number(int, lambda v: v >= 1, ">= 1")
seed = number(int, lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)")  # what numpy and Keras take
fraction = number(float, lambda v: 0 < v <= 1, "in (0, 1]")


def refuse_nondividing(parser, option, sizes, dims, names):
    """Exits through ``parser.error`` if any of ``sizes`` (the block sizes given with
    ``option``) leaves a remainder in one of ``dims``, naming those sizes and ``names`` (how
    the message refers to the dims): ``--block-sizes 16, 32 must divide --hidden (40)``."""
    bad = [size for size in sizes if any(dim % size for dim in dims)]
    if bad:
        parser.error(f"{option} {', '.join(map(str, bad))} must divide {names}")
