"""Run a driver's independent pieces as parallel subprocesses (``scripts/sft_ablation.py`` variants,
``scripts/grpo_experiment.py`` seeds): each prints one ``RESULT <json>`` line; at most ``jobs`` at once."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def run_jobs(commands: dict, jobs: int, cwd: Path, on_result: Callable[[object, dict], None] | None = None) -> dict:
    """``{key: command}`` → ``{key: the JSON its RESULT line carried}``, ``jobs`` processes at a time;
    ``on_result(key, result)`` as each finishes. A process that fails or prints no RESULT line stops all."""
    pending, running, results = list(commands), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            key = pending.pop(0)
            running.append((key, subprocess.Popen(commands[key], stdout=subprocess.PIPE, text=True, cwd=cwd)))
        time.sleep(2)
        for key, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((key, proc))
            line = next((x for x in proc.stdout.read().splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                for _, other in running:
                    other.kill()
                raise SystemExit(f"{key!r} failed (exit {proc.returncode})")
            results[key] = json.loads(line[len("RESULT ") :])
            if on_result is not None:
                on_result(key, results[key])
    return results
