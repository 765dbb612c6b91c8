"""Shared code of the Qwen2.5-VL course.

Each module names the notebook that teaches it:

- ``helpers.qwen``      00: the offline processor, the course model, the 3B config.
- ``helpers.profiles``  the cpu / gpu profiles (``QWENVL_PROFILE``).
"""

import os as _os

# Nothing in this course may reach a model hub: set before transformers is imported.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if _os.environ.get("QWENVL_BLOCK_NETWORK") == "1":
    from helpers.netguard import block_network as _block_network

    _block_network()
