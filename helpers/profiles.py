"""The two run profiles of the course, in one place.

``QWENVL_PROFILE=cpu`` (the default, what CI runs: minutes on 2 cores) or ``QWENVL_PROFILE=gpu``
(small scale on one GPU). A notebook reads its settings with ``settings("sft")`` and never edits
code to switch: set the variable (or pass ``profile=``) instead.
"""

from __future__ import annotations

import os

PROFILE_NAMES = ("cpu", "gpu")

# Every profile-dependent number of the course lives here, grouped by the part that uses it.
PROFILES: dict[str, dict[str, dict]] = {
    "cpu": {
        "course": {"device": "cpu", "dtype": "float32"},
    },
    "gpu": {
        "course": {"device": "cuda", "dtype": "bfloat16"},
    },
}


def current_profile(profile: str | None = None) -> str:
    """The profile in force: ``profile`` if given, else ``$QWENVL_PROFILE``, else ``"cpu"``."""
    name = (profile or os.environ.get("QWENVL_PROFILE") or "cpu").strip().lower()
    if name not in PROFILE_NAMES:
        raise ValueError(
            f"unknown profile {name!r}: QWENVL_PROFILE must be one of {', '.join(PROFILE_NAMES)}"
        )
    return name


def settings(section: str, profile: str | None = None) -> dict:
    """A copy of the settings of ``section`` (e.g. ``"sft"``) in the profile in force."""
    name = current_profile(profile)
    sections = PROFILES[name]
    if section not in sections:
        raise KeyError(f"profile {name!r} has no section {section!r}; known: {sorted(sections)}")
    return dict(sections[section])
