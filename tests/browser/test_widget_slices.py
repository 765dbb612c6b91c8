"""The widget slice: which cells the browser suite runs for a notebook (no browser needed)."""

from __future__ import annotations

import ast

import nbformat
import pytest
from labdriver import NOTEBOOK_DIR
from widget_slices import defined_names, is_widget_cell, modified_names, slice_notebook, used_names, widget_slice


def test_names_a_cell_binds_reads_and_modifies():
    tree = ast.parse(
        "import numpy as np, os.path\nfrom a import b as c\nx, (y, *z) = f(w)\n"
        "for i in r: q = i\nwith open(p) as fh: pass\ndef g(u): return u + h\n"
        "d[k] = 1\nobj.attr = 2\nn += 1\nif (m := 3): pass"
    )
    assert defined_names(tree) == {"np", "os", "c", "x", "y", "z", "i", "q", "fh", "g", "d", "obj", "n", "m"}
    assert {"f", "w", "r", "p", "h", "k"} <= used_names(tree) and "u" in used_names(tree)  # read inside g, too
    assert "print" not in used_names(ast.parse("print(1)"))  # builtins come from nowhere
    assert modified_names(tree) == {"d", "obj", "n"}


def test_a_widget_cell_calls_show():
    assert is_widget_cell("show(view, n=slider);") and is_widget_cell("box = helpers.widgets.show(v)")
    assert not is_widget_cell("shown = 1  # show(...) in a comment") and not is_widget_cell("%matplotlib inline")


def test_the_slice_keeps_what_the_widget_reads_and_nothing_else():
    cells = [
        "import ipywidgets as w\nfrom helpers.widgets import show",  # 0: needed (w, show)
        "model = train()",  # 1: not read by the widget
        "photo = load()",  # 2: needed through view
        "photo.tag = 'x'",  # 3: modifies photo: needed
        "def view(n): return describe(photo, n)",  # 4: needed
        "show(view, n=w.IntSlider())",  # 5: the widget
        "print(model)",
    ]  # 6: after the widget
    assert widget_slice(cells) == [0, 2, 3, 4, 5]
    assert widget_slice(["x = 1", "print(x)"]) == []  # no widget, nothing to run


@pytest.mark.parametrize("path", sorted(NOTEBOOK_DIR.glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_course_widget_is_in_its_slice(path):
    notebook = nbformat.read(path, as_version=4)
    widgets = [c.source for c in notebook.cells if c.cell_type == "code" and is_widget_cell(c.source)]
    sliced = slice_notebook(path)
    assert [c.source for c in sliced.cells if is_widget_cell(c.source)] == widgets
    assert sliced.metadata.kernelspec == notebook.metadata.kernelspec
    assert all(not c.outputs for c in sliced.cells)
