"""What several test modules share: a tiny course model, and a course entry point under torchrun."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers.qwen import course_config, load_model

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (tests never use a fixed port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_processes(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 -m MODULE ARGS``: two CPU processes of one
    thread each, the cpu profile, a free rendezvous port. Returns the finished process (output captured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWENVL_PROFILE": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module, *args]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_model(seed: int = 0):
    """A 2-layer course model (text width 64, vision width 32), seeded: fast enough to train in a unit test."""
    config = course_config(text_hidden=64, text_layers=2, text_mlp=128, vision_hidden=32, vision_depth=2,
                           vision_mlp=64, fullatt_block_indexes=(1,))  # fmt: skip
    return load_model(config=config, seed=seed)
