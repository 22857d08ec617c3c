"""The benchmark scripts run end to end on tiny sizes and write their report sections."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_libxsmm, bench_matmul, bench_neurons, bench_sparse_dot  # noqa: E402


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
