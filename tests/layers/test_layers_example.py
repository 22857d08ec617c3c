"""examples/train_lstm.py --quick runs end to end and writes its table and plot."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "train_lstm.py")


def test_quick_run_writes_table_and_plot(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = (tmp_path / "lstm_results_quick.md").read_text()
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
