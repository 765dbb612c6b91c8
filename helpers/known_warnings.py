"""The warnings the pinned libraries raise about their own code, which the course cannot act on
(notebooks 10–13, and the test run through pyproject.toml).

transformers 5.x renamed gradient checkpointing to activation checkpointing and warns on every use of
an old name (removed in v6). TRL's ``SFTConfig`` and ``GRPOConfig`` still default
``gradient_checkpointing=True`` and its trainers call ``gradient_checkpointing_enable`` / ``_disable``;
PEFT reads ``is_gradient_checkpointing`` when it wraps a model. So every TRL or PEFT run prints them,
with the library's install path. The course's own code uses the new names.

``ignore_known_library_warnings()`` silences exactly these messages, by message and category (as
``warnings.filterwarnings`` matches them), so any other warning still shows; pyproject.toml's pytest
filters list the same, which tests/test_known_warnings.py checks.
"""

import warnings

KNOWN_LIBRARY_WARNINGS = (
    (r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated and will be removed in v6", FutureWarning),
)


def ignore_known_library_warnings() -> None:
    """``warnings.filterwarnings("ignore", message=…, category=…)`` for each of ``KNOWN_LIBRARY_WARNINGS``."""
    for message, category in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
