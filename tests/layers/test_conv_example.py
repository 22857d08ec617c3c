"""examples/train_conv.py and benchmarks/bench_conv.py run end to end on tiny sizes."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "train_conv.py")
sys.path.insert(0, ROOT)

from benchmarks import bench_conv  # noqa: E402
from tests.example_scripts import assert_refused, example  # noqa: E402


def test_example_quick_mode_writes_its_table(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "conv_results.md"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = out.read_text()
    assert "- Machine: " in report and "- Date: " in report
    assert "- Command: `python examples/train_conv.py --quick`" in report
    rows = [line for line in report.splitlines()
            if line.startswith("| dense Conv2D") or line.startswith("| BlockSparseConv2D")]
    assert len(rows) == 2
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    # widths 16 and 32; the 3x3 body has the same kernel weights (3*3*16*16), biases aside
    assert cells[0][1] == "16" and cells[1][1] == "32"
    body = [int(c[4].replace(",", "")) for c in cells]
    assert body[0] - 16 == body[1] - 32 == 3 * 3 * 16 * 16
    for c in cells:
        assert 0 <= float(c[5]) <= 100 and float(c[6]) > 0


def test_example_help():
    run = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "--quick" in run.stdout and "--mnist" in run.stdout


def test_benchmark_writes_its_section(tmp_path):
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\n## Other section\n\nkept\n")
    rows = bench_conv.main(["--batch", "2", "--size", "6", "--channels", "32", "32",
                            "--block-sizes", "16", "--densities", "0.25", "1.0",
                            "--repeats", "1", "--out", str(tmp_path)])
    # One row per layout and implementation.
    assert len(rows) == 4 and all(r["fwd"] > 0 and r["bwd"] > 0 for r in rows)
    assert [r["impl"] for r in rows] == ["fused", "im2col"] * 2
    assert all(r["err"] < 1e-4 for r in rows)  # matches tf.nn.conv2d with the densified kernel
    report = (tmp_path / "benchmarks.md").read_text()
    assert report.count(f"## {bench_conv.TITLE}") == 1 and "## Other section" in report
    assert "- Command: `python benchmarks/bench_conv.py --batch 2" in report
    assert "--out" not in report
    assert "| 16 | 0.250 | " in report and "| 16 | 1.000 | " in report
    # written again: the section is replaced, not repeated
    bench_conv.main(["--batch", "2", "--size", "6", "--channels", "32", "32", "--block-sizes", "16",
                     "--densities", "0.5", "--repeats", "1", "--out", str(tmp_path)])
    report = (tmp_path / "benchmarks.md").read_text()
    assert report.count(f"## {bench_conv.TITLE}") == 1 and "| 16 | 0.500 | " in report


def test_benchmark_quick_writes_nothing(tmp_path):
    rows = bench_conv.main(["--quick", "--out", str(tmp_path)])
    assert len(rows) == 4 and not os.listdir(tmp_path)  # 2 layouts x 2 implementations


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "argument --batch: must be >= 1; got 0"),
    (["--size", "0"], "argument --size: must be >= 1; got 0"),
    (["--kernel", "-3"], "argument --kernel: must be >= 1; got -3"),
    (["--channels", "64", "0"], "argument --channels: must be >= 1; got 0"),
    (["--block-sizes", "12"], "argument --block-sizes: invalid choice: 12"),
    (["--densities", "0.5", "0"], "argument --densities: must be in (0, 1]; got 0"),
    (["--repeats", "0"], "argument --repeats: must be >= 1; got 0"),
    (["--seed", "-1"], "argument --seed: must be in [0, 2**32); got -1"),
    (["--channels", "48", "64"], "--block-sizes 32 must divide both --channels (48 and 64)"),
    (["--channels", "40", "40", "--block-sizes", "8", "16", "32"],
     "--block-sizes 16, 32 must divide both --channels (40 and 40)"),
])
def test_benchmark_refuses_bad_arguments(argv, message, capsys):
    assert_refused(bench_conv.parse_args, argv, message, capsys)




@pytest.mark.parametrize("argv, message", [
    (["--block-size", "0"], "--block-size must be one of 1, 8, 16, 32, 64; got 0"),
    (["--block-size", "4"], "--block-size must be one of 1, 8, 16, 32, 64; got 4"),
    (["--block-size", "32", "--dense-width", "48"],
     "--block-size 32 must divide --dense-width (48) and --sparse-width (256)"),
    (["--dense-width", "128", "--sparse-width", "64"],
     "--sparse-width (64) must be at least --dense-width (128)"),
    (["--dense-width", "0"], "argument --dense-width: must be >= 1; got 0"),
    (["--sparse-width", "-16"], "argument --sparse-width: must be >= 1; got -16"),
    (["--layers", "-1"], "argument --layers: must be >= 1; got -1"),
    (["--layers", "0"], "argument --layers: must be >= 1; got 0"),
    (["--timing-repeats", "0"], "argument --timing-repeats: must be >= 1; got 0"),
    (["--batch", "0"], "argument --batch: must be >= 1; got 0"),
    (["--seed", "-3"], "argument --seed: must be in [0, 2**32); got -3"),  # Keras' error
    (["--batch", "1.5"], "argument --batch: invalid int value: '1.5'"),
])
def test_example_refuses_bad_arguments(argv, message, capsys):
    assert_refused(example("train_conv").parse_args, argv, message, capsys)
