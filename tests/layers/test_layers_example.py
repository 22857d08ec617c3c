"""examples/train_lstm.py --quick runs end to end and writes its table and plot."""

import os
import subprocess
import sys

import pytest

from tests.example_scripts import assert_refused, example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "train_lstm.py")


def test_quick_run_writes_table_and_plot(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = (tmp_path / "lstm_results_quick.md").read_text()
    assert f"command: `python examples/train_lstm.py --quick --out {tmp_path}`" in report
    rows = [line for line in report.splitlines() if line.startswith("| dense")
            or line.startswith("| sparse")]
    assert len(rows) == 2
    params = [int(r.split("|")[4].strip().replace(",", "")) for r in rows]
    assert abs(params[0] - params[1]) <= 0.01 * params[1]  # equal parameter budgets
    for r in rows:
        bpc = float(r.split("|")[5])
        assert 0 < bpc < 8
    png = (tmp_path / "lstm_bpc_quick.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_help():
    run = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "--quick" in run.stdout and "--data" in run.stdout




@pytest.mark.parametrize("argv, message", [
    (["--block-size", "0"], "--block-size must be one of 1, 8, 16, 32, 64; got 0"),
    (["--block-size", "4"], "--block-size must be one of 1, 8, 16, 32, 64; got 4"),
    (["--block-size", "64", "--sparse-units", "96"],
     "--block-size 64 must divide --sparse-units (96)"),
    (["--sparse-units", "0"], "argument --sparse-units: must be >= 1; got 0"),
    (["--seq-len", "0"], "argument --seq-len: must be >= 1; got 0"),
    (["--steps", "-2"], "argument --steps: must be >= 1; got -2"),
    (["--density", "0"], "--density must be in (0, 1]; got 0"),
    (["--max-chars", "-5"], "--max-chars must be >= 0 (0: all); got -5"),
    (["--max-chars", "5000"], "--max-chars must be 0 (all) or at least 10,000; got 5000"),
    (["--max-chars", "12000", "--seq-len", "1000"],
     "--max-chars 12000 holds out 600 characters (the last 5%), which must be more than "
     "--seq-len + 1 (1001)"),
    (["--data", "/nonexistent/text.txt"], "--data: no such file: '/nonexistent/text.txt'"),
])
def test_refuses_bad_arguments(argv, message, capsys):
    assert_refused(example("train_lstm").parse_args, argv, message, capsys)


def test_compare_fused_reads_no_data():
    assert example("train_lstm").parse_args(["--compare-fused", "--data", "/nonexistent/text.txt"])


def test_too_short_held_out_text_stops_before_training(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij " * 1100)  # 12,100 characters: 605 held out
    with pytest.raises(SystemExit) as exc:
        example("train_lstm").main(["--data", str(path), "--seq-len", "1000"])
    assert exc.value.code == (f"{path}: the held-out last 5% of its 12,100 characters (605) "
                              "must be more than --seq-len + 1 (1001); use a longer text or a "
                              "shorter --seq-len")
