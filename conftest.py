"""Every test runs offline and writes only to temporary folders.

- Sockets to anything but loopback raise, in pytest and in the kernels that nbval and the browser
  suite start (they inherit QWENVL_BLOCK_NETWORK and block at ``import helpers``).
- The course cache (converted tokenizer, generated videos, the SFT checkpoints notebook 11 starts
  from) is a fresh temporary folder for the session, never the reader's ``~/.cache/qwenvl-course``:
  ``QWENVL_CACHE`` is set before anything is imported, and the kernels inherit it, so notebook 11
  finds the checkpoint notebook 10 saved earlier in the same session. It is removed at the end.
"""

import os
import shutil
import tempfile

os.environ["QWENVL_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
SESSION_CACHE = tempfile.mkdtemp(prefix="qwenvl-test-cache-")
os.environ["QWENVL_CACHE"] = SESSION_CACHE

from helpers.netguard import block_network  # noqa: E402

block_network()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)
