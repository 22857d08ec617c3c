"""examples/demo.py: its arguments and a small run."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import demo  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "must be at least 1; got 0"),  # ran, and its NaN errors passed the check
    (["--repeats", "0"], "must be at least 1; got 0"),  # min() of an empty sequence
    (["--hidden", "-64"], "must be at least 1; got -64"),  # numpy's negative dimensions
    (["--hidden", "100"], "--block-size 32 must divide --hidden 100"),  # the op's shape error
    (["--block-size", "4"], "invalid choice: 4"),
    (["--density", "2"], r"--density must be in \(0, 1\]; got 2.0"),  # accepted silently
    (["--density", "0"], r"--density must be in \(0, 1\]; got 0.0"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_small_run_checks_its_products():
    errors = demo.main(["--hidden", "64", "--block-size", "16", "--batch", "3", "--repeats", "1",
                        "--density", "0.01"])  # draws no block: one is set
    assert set(errors) == {"y", "dx", "dw"} and all(0 <= e <= 1e-4 for e in errors.values())
