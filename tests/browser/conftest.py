"""Fixtures of the browser suite: one JupyterLab server and one Chromium for the whole session.

Both are context managers (``labdriver``), so they are stopped when the session ends, also after a
failing test, Ctrl-C or SIGTERM; the server also gets SIGTERM if the pytest process itself dies
(even by SIGKILL). Each test
shuts its kernel down when it ends, so only one kernel runs at a time on the 2 cores.

In one process the suite runs last (after the unit tests and nbval): the hook below moves its
tests to the end of the session, whatever order they were collected in. Under pytest-xdist it moves
them to the front instead: the suite is one file, so one worker takes all of it, and it is the
longest, so it goes first while the other worker takes the rest (most of the suite's time is
waiting on the page and the kernel, so it overlaps well with the unit tests).

Environment knobs (all optional):
- ``COURSE_NOTEBOOK_DIR``: the folder whose ``*.ipynb`` the suite slices (default ``notebooks/``);
  the server serves a temporary folder holding the slices.
- ``COURSE_NOTEBOOKS``: which of them, as a glob (default ``*.ipynb``); ``make test`` checks the
  light notebooks ``0[0-9]_*`` in its first session and the training notebooks ``1[0-9]_*`` in the
  second, after nbval has run them (their slices read the checkpoints notebook 10 leaves in the cache).
- ``COURSE_BROWSER_TIMEOUT``: seconds one widget slice's Run All may take (default 600).
- ``COURSE_SCREENSHOTS``: where screenshots go (default ``screenshots/``, ignored by git).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # the lab driver: scripts/labdriver.py
from labdriver import SCREENSHOTS, LabServer, chromium  # noqa: E402

BROWSER_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(session, config, items):
    """Run the browser tests after everything else (unit tests, then nbval, then the browser); under
    pytest-xdist, first (see the module docstring)."""
    browser = [item for item in items if BROWSER_DIR in Path(str(item.path)).resolve().parents]
    if browser:
        others = [item for item in items if item not in browser]
        items[:] = browser + others if hasattr(config, "workerinput") else others + browser


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory):
    """JupyterLab serving a temporary folder, where each test writes the widget slice it runs."""
    # A CI timeout sends SIGTERM: turn it into Ctrl-C, so pytest still tears the fixtures down.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with LabServer(tmp_path_factory.mktemp("lab")) as server:
            yield server
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def browser():
    with chromium() as context:
        yield context


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
