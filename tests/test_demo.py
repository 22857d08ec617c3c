"""examples/demo.py: its arguments and a small run."""
import pytest

from tests.example_scripts import assert_refused, example

demo = example("demo")


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "must be >= 1; got 0"),  # ran, and its NaN errors passed the check
    (["--repeats", "0"], "must be >= 1; got 0"),  # min() of an empty sequence
    (["--hidden", "-64"], "must be >= 1; got -64"),  # numpy's negative dimensions
    (["--hidden", "100"], "--block-size 32 must divide --hidden (100)"),  # the op's shape error
    (["--block-size", "4"], "invalid choice: 4"),
    (["--density", "2"], "--density: must be in (0, 1]; got 2"),  # accepted silently
    (["--density", "0"], "--density: must be in (0, 1]; got 0"),
    (["--seed", "-1"], "--seed: must be in [0, 2**32); got -1"),  # numpy's seed error
])
def test_bad_arguments_are_named(argv, message, capsys):
    assert_refused(demo.parse_args, argv, message, capsys)


def test_a_small_run_checks_its_products():
    errors = demo.main(["--hidden", "64", "--block-size", "16", "--batch", "3", "--repeats", "1",
                        "--density", "0.01"])  # draws no block: one is set
    assert set(errors) == {"y", "dx", "dw"} and all(0 <= e <= 1e-4 for e in errors.values())
