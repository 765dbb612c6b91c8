"""Every test runs offline and writes only to temporary folders.

- Sockets to anything but loopback raise, in pytest and in the kernels that nbval and the browser
  suite start (they inherit QWENVL_BLOCK_NETWORK and block at ``import helpers``).
- The course cache (converted tokenizer, generated videos, the SFT checkpoints notebook 11 starts
  from) is a fresh temporary folder for the session, never the reader's ``~/.cache/qwenvl-course``:
  ``QWENVL_CACHE`` is set before anything is imported, and the kernels inherit it, so notebook 11
  finds the checkpoint notebook 10 saved earlier in the same session. It is removed at the end.
- The processes the tests start (nbval's kernels, JupyterLab and its kernels, scripts) get a fresh
  ``TMPDIR`` beside that cache, removed with it: nbval kills its kernels, so a notebook's
  ``scratch_dir()`` cannot clean up after itself there, and each run would leave checkpoints behind.
  Pytest itself keeps the system's temporary folder, where ``tmp_path`` keeps only the folders of
  failed tests (``tmp_path_retention_policy`` in pyproject.toml).
"""

import os
import shutil
import tempfile

os.environ["QWENVL_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
tempfile.tempdir = tempfile.gettempdir()  # this process keeps the system's folder, whatever TMPDIR says next
SESSION_FOLDER = tempfile.mkdtemp(prefix="qwenvl-test-")
os.environ["QWENVL_CACHE"] = os.path.join(SESSION_FOLDER, "cache")
os.environ["TMPDIR"] = os.path.join(SESSION_FOLDER, "tmp")
os.mkdir(os.environ["TMPDIR"])

from helpers.netguard import block_network  # noqa: E402

block_network()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_FOLDER, ignore_errors=True)
