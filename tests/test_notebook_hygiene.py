"""Committed notebooks are executed top to bottom, clean, small, free of machine paths, and leave no
folder behind."""

import json
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MACHINE_PATH = re.compile(r"(/work/|/root/|/home/\w|/tmp/|/Users/\w|[A-Z]:\\\\Users|site-packages|/usr/lib/python)")
MAX_OUTPUT_BYTES = 1_000_000


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_hygiene(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    kernelspec = notebook.metadata.get("kernelspec", {})
    assert kernelspec.get("name"), "no named kernelspec"
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code_cells]
    assert counts == list(range(1, len(code_cells) + 1)), f"not executed top to bottom in one kernel: {counts}"
    for number, cell in enumerate(code_cells, 1):
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"cell {number} has an error output"
            text = json.dumps(output)
            assert len(text) <= MAX_OUTPUT_BYTES, f"cell {number} has an output of {len(text)} bytes"
            if output.output_type == "stream":
                assert output.name != "stderr" or not re.search(r"Traceback|Error", output.text), (
                    f"cell {number} printed an error to stderr: {output.text[:200]}"
                )
            found = MACHINE_PATH.search(text)
            assert not found, (
                f"cell {number} shows a machine path: …{text[max(0, found.start() - 60) : found.end() + 60]}…"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_leaves_no_temporary_folder_behind(path):
    """A folder from ``tempfile.mkdtemp`` outlives the kernel; ``helpers.cache.scratch_dir`` does not."""
    sources = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    found = [number for number, source in enumerate(sources, 1) if "mkdtemp(" in source]
    assert not found, f"code cells {found} call mkdtemp: use helpers.cache.scratch_dir(), removed when the kernel exits"
