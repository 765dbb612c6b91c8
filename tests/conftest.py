"""Fixtures the unit tests share. A test module that needs other settings defines its own
``processor`` or ``model`` fixture, which takes precedence over these."""

import pytest

from helpers.qwen import load_model, load_processor


@pytest.fixture(scope="module")
def model():
    """The course model, seeded (``load_model()``), fresh for each test module."""
    return load_model()


@pytest.fixture(scope="module")
def processor():
    """The offline course processor with the checkpoint's default pixel limits."""
    return load_processor()
