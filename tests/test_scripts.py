"""The drivers' shared job runner (scripts/jobs.py): results by key, in parallel, failures stop everything."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from jobs import run_jobs  # noqa: E402


def job(value, code=0):
    return [
        sys.executable,
        "-c",
        f"import json, sys; print('noise'); print('RESULT ' + json.dumps({{'v': {value}}})); sys.exit({code})",
    ]


def test_results_come_back_by_key_and_each_is_reported():
    seen = []
    results = run_jobs({"a": job(1), "b": job(2), "c": job(3)}, jobs=2, cwd=ROOT, on_result=lambda k, r: seen.append(k))
    assert results == {"a": {"v": 1}, "b": {"v": 2}, "c": {"v": 3}} and sorted(seen) == ["a", "b", "c"]


@pytest.mark.parametrize("bad", [job(1, code=3), [sys.executable, "-c", "print('no result line')"]])
def test_a_failed_job_stops_the_run_naming_it(bad):
    with pytest.raises(SystemExit, match="'broken' failed"):
        run_jobs({"fine": job(1), "broken": bad}, jobs=2, cwd=ROOT)
