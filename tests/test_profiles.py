"""helpers.profiles: the cpu / gpu profiles as frozen typed settings, and the comparison with a
recorded run's settings."""

import dataclasses

import pytest

from helpers import profiles
from helpers.data import make_split
from helpers.grpo import GRPOSettings
from helpers.qwen import course_config


def test_profiles():
    assert profiles.current_profile() in profiles.PROFILE_NAMES
    with pytest.raises(ValueError, match="'tpu'.*cpu, gpu"):
        profiles.current_profile("tpu")
    with pytest.raises(KeyError, match="no section 'nope'"):
        profiles.settings("nope")


@pytest.mark.parametrize("name", profiles.PROFILE_NAMES)
def test_every_profile_is_typed_frozen_and_accepted_by_what_it_configures(name):
    """Each section builds its typed settings; the model and data options are ones course_config and
    make_split accept; no section hands out a value a caller could edit in place."""
    sections = {section: profiles.settings(section, name) for section in profiles.PROFILES[name]}
    assert isinstance(sections["grpo"], GRPOSettings)
    for value in sections.values():
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.steps = 1
    sections["grpo"].reward_weights["task"] = 0.0  # a fresh copy each call
    assert profiles.settings("grpo", name).reward_weights["task"] == 1.0
    sft = sections["sft"]
    assert course_config(**sft.model).text_config.hidden_size == (
        sft.model.text_hidden or course_config().text_config.hidden_size
    )
    assert make_split("val", 2, 0, **sft.data)[0].image.size == (sft.data.image_size,) * 2


def test_changed_settings_compares_as_json():
    recorded = {"lr": 1e-4, "shape_size": [0.2, 0.3], "gone": 1}  # as a metrics.json stores them
    current = {"lr": 3e-5, "shape_size": (0.2, 0.3), "new": {"a": 1}}
    assert profiles.changed_settings(recorded, current) == {
        "gone": (1, None),
        "lr": (1e-4, 3e-5),
        "new": (None, {"a": 1}),
    }
    assert profiles.changed_settings(current, dict(current)) == {}
    typed = profiles.settings("sft", "gpu")  # a metrics file records the data options the profile sets
    recorded = {**profiles.as_plain(typed), "data": {"image_size": 112, "max_distractors": 2}, "steps": 10}
    assert profiles.changed_settings(recorded, typed) == {"steps": (10, typed.steps)}
