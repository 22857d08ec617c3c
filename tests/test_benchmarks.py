"""The benchmark scripts run end to end on tiny sizes and write their report sections."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_libxsmm, bench_matmul, bench_neurons, bench_sparse_dot  # noqa: E402
from tests.example_scripts import assert_refused  # noqa: E402


def test_sparse_dot_allocator_comparison_writes_its_section(tmp_path):
    """--allocators times the training steps in one process per allocator setting (each checked
    to have run with its setting) and writes a section of its own."""
    rows = bench_sparse_dot.main(["--allocators", "--shape", "16", "128", "64", "--block-sizes",
                                  "32", "--repeats", "1", "--out", str(tmp_path)])
    assert [r[0] for r in rows] == ["dense"] + [
        f"32 {a_in} {a_out}" for a_in, a_out in bench_sparse_dot.FRACTIONS]
    assert all(a > 0 and b > 0 for _, a, b in rows)
    report = (tmp_path / "benchmarks.md").read_text()
    assert report.count("## CPU: sparse_dot training steps and TensorFlow's CPU allocator") == 1
    assert "| dense `tf.matmul` |  |  | " in report and "| 32 | 0.25 | 1.00 | " in report
    assert ("- Command: `python benchmarks/bench_sparse_dot.py --allocators --shape 16 128 64 "
            "--block-sizes 32 --repeats 1`") in report


def test_benchmarks_write_their_sections(tmp_path):
    rows = bench_matmul.main(["--hidden", "256", "--batches", "8", "--block-sizes", "32",
                              "--densities", "0.5", "1.0", "--repeats", "1", "--out", str(tmp_path)])
    assert len(rows) == 2 and all(r["fprop"] > 0 for r in rows)
    # Two passes: one row per case all the same, each the fastest of both passes.
    rows = bench_sparse_dot.main(["--shape", "16", "128", "64", "--block-sizes", "32",
                                  "--repeats", "1", "--rounds", "2", "--out", str(tmp_path)])
    assert len(rows) == len(bench_sparse_dot.FRACTIONS)
    report = (tmp_path / "benchmarks.md").read_text()
    # Both sections, each once, the first kept when the second was written.
    assert report.count("## CPU: BlocksparseMatMul against dense tf.matmul") == 1
    assert report.count("## CPU: sparse_dot (conditional computation)") == 1
    assert report.count("| 8 | 32 | ") == 2 and (tmp_path / "benchmark_cpu_speedup.png").exists()
    assert ("- Command: `python benchmarks/bench_matmul.py --hidden 256 --batches 8 --block-sizes 32 "
            "--densities 0.5 1.0 --repeats 1`") in report
    # Each section ends by pointing at its history, which the scripts never write.
    assert ("[benchmark_history.md](benchmark_history.md#cpu-blocksparsematmul-against-dense-tfmatmul)"
            in report)
    assert report.count("[benchmark_history.md](") == 2
    # bfloat16 gets a section and a plot of its own beside float32's.
    rows = bench_matmul.main(["--hidden", "256", "--batches", "8", "--block-sizes", "32",
                              "--densities", "0.5", "--repeats", "1", "--dtype", "bfloat16",
                              "--out", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["fprop"] > 0
    report = (tmp_path / "benchmarks.md").read_text()
    assert report.count("## CPU: BlocksparseMatMul in bfloat16 against dense bfloat16") == 1
    assert report.count("## CPU: BlocksparseMatMul against dense tf.matmul") == 1
    assert (tmp_path / "benchmark_cpu_speedup_bfloat16.png").exists()


def test_neuron_level_benchmark_agrees_with_tf_sparse(tmp_path):
    rows = bench_neurons.main(["--units", "600", "--fan-in", "3", "--batches", "1", "5",
                               "--repeats", "1", "--out", str(tmp_path)])
    assert [(r["n"], r["fan_in"], r["N"]) for r in rows] == [(600, 3, 1), (600, 3, 5)]
    # tf.sparse is an independent implementation of the same three products.
    assert all(r["err"] < 1e-5 for r in rows)
    report = (tmp_path / "benchmarks.md").read_text()
    assert report.count("## CPU: neuron-level layers (block size 1)") == 1
    assert "| 600 | 3 | 5 |" in report
    # The command as given, without the report's folder.
    assert ("- Command: `python benchmarks/bench_neurons.py --units 600 --fan-in 3 --batches 1 5 "
            "--repeats 1`") in report


@pytest.mark.skipif(not bench_libxsmm.libxsmm_available(),
                    reason="needs LIBXSMM's headers (apt-get install libxsmm-dev), g++ and AVX2")
def test_libxsmm_comparison_agrees_with_the_kernels():
    # LIBXSMM's kernels are an independent implementation of the same products: the script
    # raises if the two results differ beyond float32 rounding.
    rows = bench_libxsmm.main(["--quick", "--repeats", "1"])
    assert {(r["product"], r["bs"]) for r in rows} == {
        ("forward", 16), ("forward", 32), ("grad_w", 16), ("grad_w", 32)}
    assert all(r["ours_ms"] > 0 and r["libxsmm_ms"] > 0 for r in rows)


@pytest.mark.parametrize("script, argv, message", [
    (bench_matmul, ["--repeats", "0", "--quick"], "argument --repeats: must be >= 1; got 0"),
    (bench_matmul, ["--rounds", "0"], "argument --rounds: must be >= 1; got 0"),
    (bench_matmul, ["--hidden", "-8"], "argument --hidden: must be >= 1; got -8"),
    (bench_matmul, ["--batches", "64", "0"], "argument --batches: must be >= 1; got 0"),
    (bench_matmul, ["--block-sizes", "4"], "argument --block-sizes: invalid choice: 4"),
    (bench_matmul, ["--densities", "0"], "argument --densities: must be in (0, 1]; got 0"),
    (bench_matmul, ["--densities", "1.5"], "argument --densities: must be in (0, 1]; got 1.5"),
    (bench_matmul, ["--sparse-max-density", "-0.1"],
     "argument --sparse-max-density: must be in [0, 1]; got -0.1"),
    (bench_matmul, ["--hidden", "100"], "--block-sizes 8, 16, 32, 64 must divide --hidden (100)"),
    (bench_matmul, ["--hidden", "100", "--quick"], "--block-sizes 32 must divide --hidden (100)"),
    (bench_sparse_dot, ["--shape", "16", "0", "64"], "argument --shape: must be >= 1; got 0"),
    (bench_sparse_dot, ["--repeats", "0"], "argument --repeats: must be >= 1; got 0"),
    (bench_sparse_dot, ["--rounds", "-1"], "argument --rounds: must be >= 1; got -1"),
    (bench_sparse_dot, ["--block-sizes", "2"], "argument --block-sizes: invalid choice: 2"),
    (bench_sparse_dot, ["--shape", "16", "128", "48", "--block-sizes", "16", "32"],
     "--block-sizes 32 must divide C (128) and K (48) of --shape"),
    (bench_sparse_dot, ["--shape", "16", "48", "48", "--quick"],
     "--block-sizes 32 must divide C (48) and K (48) of --shape"),
    (bench_neurons, ["--units", "0"], "argument --units: must be >= 1; got 0"),
    (bench_neurons, ["--fan-in", "0"], "argument --fan-in: must be >= 1; got 0"),
    (bench_neurons, ["--batches", "1", "-5"], "argument --batches: must be >= 1; got -5"),
    (bench_neurons, ["--repeats", "0"], "argument --repeats: must be >= 1; got 0"),
    (bench_neurons, ["--seed", "-1"], "argument --seed: must be in [0, 2**32); got -1"),
    (bench_neurons, ["--units", "600", "3", "--fan-in", "4"],
     "--fan-in (4) must be at most --units (3)"),
    (bench_libxsmm, ["--block-sizes", "1"], "argument --block-sizes: invalid choice: 1"),
    (bench_libxsmm, ["--densities", "0.1", "0"], "argument --densities: must be in (0, 1]; got 0"),
    (bench_libxsmm, ["--forward-rows", "0"], "argument --forward-rows: must be >= 1; got 0"),
    (bench_libxsmm, ["--grad-rows", "0"], "argument --grad-rows: must be >= 1; got 0"),
    (bench_libxsmm, ["--repeats", "0"], "argument --repeats: must be >= 1; got 0"),
    (bench_libxsmm, ["--repeats", "1.5"], "argument --repeats: invalid int value: '1.5'"),
])
def test_benchmarks_refuse_bad_arguments(script, argv, message, capsys):
    assert_refused(script.parse_args, argv, message, capsys)
