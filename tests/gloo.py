"""Worker processes joined by a gloo process group, for the torch data-parallel tests
(tests/test_multi_device_torch.py, tests/doors/test_torch_door.py, tests/test_functional_distributed.py)."""

import os
import socket
import subprocess

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv_of, tmp_path, world=2, timeout=240, meanwhile=None):
    """Starts `world` processes, `argv_of(out)` each (`out`: the .npz file that rank writes), with the torch
    backend and the torch.distributed environment of one host; runs `meanwhile()` in this process while they
    train; asserts that every rank exited with 0 (else shows its output). Returns (each rank's npz as a dict, what
    `meanwhile` returned)."""
    port = str(free_port())
    processes, outputs = [], []
    for rank in range(world):
        env = dict(os.environ, KERAS_BACKEND="torch", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        outputs.append(str(tmp_path / f"rank{rank}.npz"))
        processes.append(subprocess.Popen(argv_of(outputs[-1]), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        result = meanwhile() if meanwhile is not None else None
        for p in processes:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(processes):
        assert p.returncode == 0, f"rank {rank} failed:\n{logs[rank][-4000:]}"
    return [dict(np.load(out)) for out in outputs], result
