"""Data-parallel training: 2 local MultiWorkerMirroredStrategy workers vs one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiworker_train.py")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _load(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_two_workers_match_single_process(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    single = str(tmp_path / "single.npz")
    workers = ["127.0.0.1:%d" % p for p in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path / f"w{index}.npz"), "multi"],
            env=dict(env, TF_CONFIG=json.dumps(tf_config)), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT))
    try:
        subprocess.run([sys.executable, WORKER, single], env=env, check=True, timeout=120)
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out.decode()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reference = _load(single)
    assert len(reference) == 6  # LSTM kernel, recurrent, bias, LN gain; Dense kernel, bias
    for index in range(2):
        for got, want in zip(_load(tmp_path / f"w{index}.npz"), reference):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    initial = np.random.default_rng(0)
    initial.standard_normal((24, 5, 16)), initial.standard_normal((24, 16))  # the data
    moved = [np.abs(w - 0.3 * initial.standard_normal(w.shape)).max() for w in reference]
    assert min(moved) > 1e-4  # every weight was trained (the comparison is not vacuous)
