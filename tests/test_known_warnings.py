"""helpers.known_warnings: the library warnings the course silences, raised for real, and nothing else."""

import re
import tomllib
import warnings

import nbformat
from peft import LoraConfig, get_peft_model
from support import ROOT, tiny_model
from transformers import TrainingArguments

from helpers.known_warnings import KNOWN_LIBRARY_WARNINGS, ignore_known_library_warnings


def raise_each_known_warning(folder):
    """What TRL and PEFT do with the pinned transformers: each old checkpointing name once."""
    TrainingArguments(output_dir=str(folder), gradient_checkpointing=True, report_to="none", use_cpu=True)
    model = tiny_model()
    model.gradient_checkpointing_enable()
    model.gradient_checkpointing_disable()
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))  # reads is_gradient_checkpointing


def messages(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_the_known_warnings_are_raised_and_silenced_but_no_other(tmp_path):
    raised = messages(lambda: raise_each_known_warning(tmp_path))
    names = {re.match(r"`(\w+)`", m).group(1) for m in raised if m.startswith("`")}
    assert {
        "gradient_checkpointing",
        "gradient_checkpointing_enable",
        "gradient_checkpointing_disable",
        "is_gradient_checkpointing",
    } <= names

    def silenced():
        ignore_known_library_warnings()
        raise_each_known_warning(tmp_path)
        warnings.warn(
            "`activation_checkpointing` is deprecated (a warning nobody silenced)", FutureWarning, stacklevel=1
        )

    assert messages(silenced) == ["`activation_checkpointing` is deprecated (a warning nobody silenced)"]


def test_pytest_silences_the_same_messages():
    filters = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    ignored = [f for f in filters if f.startswith("ignore:")]
    assert ignored == [f"ignore:{message}:{category.__name__}" for message, category in KNOWN_LIBRARY_WARNINGS]


def test_the_course_itself_uses_the_new_names():
    """The filter would hide a regression of our own, so our code is read for the old names instead."""
    old_names = re.compile(
        r"\.gradient_checkpointing_(enable|disable)\(|\bis_gradient_checkpointing\b|gradient_checkpointing="
    )
    sources = {p: p.read_text() for folder in ("helpers", "scripts") for p in (ROOT / folder).glob("*.py")}
    del sources[ROOT / "helpers" / "known_warnings.py"]  # it names them, to say what it silences
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        cells = nbformat.read(notebook, as_version=4).cells
        sources[notebook] = "\n".join(c.source for c in cells if c.cell_type == "code")
    found = [f"{path.name}: {m.group(0)}" for path, text in sources.items() for m in old_names.finditer(text)]
    assert not found
