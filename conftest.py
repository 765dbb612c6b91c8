"""Every test runs offline: sockets to anything but loopback raise, in pytest and in the kernels
that nbval starts (they inherit QWENVL_BLOCK_NETWORK and block at ``import helpers``)."""

import os

os.environ["QWENVL_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from helpers.netguard import block_network  # noqa: E402

block_network()
