"""Helpers for the tests of the example scripts (examples/*.py)."""
import importlib

import pytest


def example(name):
    """examples/<name>.py as a module, not run (the repository root is on sys.path in tests)."""
    return importlib.import_module(f"examples.{name}")


def assert_refused(parse, argv, message, capsys):
    """parse(argv) stops as argparse does on a bad argument (status 2), printing `message`."""
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
