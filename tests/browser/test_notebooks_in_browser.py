"""Every widget of the course, the way a reader uses it: JupyterLab in Chromium, then move the sliders.

nbval has already executed every notebook top to bottom (and compared its ``# NBVAL_CHECK_OUTPUT``
cells), so this suite does not run whole notebooks again. For each ``notebooks/*.ipynb`` (new
notebooks are picked up by themselves) it builds the notebook's *widget slice* (``widget_slices``:
every ``show(...)`` cell and the earlier cells whose names it reads), writes it to a temporary
folder that the server serves, and:

1. opens it in JupyterLab with the course kernel (the notebook's kernelspec, not a fallback);
2. Run > Run All Cells, and waits for the kernel;
3. every code cell ran, in order (prompts ``[1]`` … ``[N]``), and no cell shows an error output or
   a widget that failed to display;
4. in every ``show(...)`` widget, moves its first slider with the keyboard (noUiSlider: focus +
   arrow key) and checks that the widget's output changed: its text and its image. A slider that
   changes only one of them (say, the image depends on another control) is followed by the next
   control until text and image have both changed. A widget with no slider gets its other
   controls operated the same way (checkbox clicked, dropdown's next option, number or text
   field edited);
5. no cell shows the same widget twice (``show`` displays the box and returns it);
6. a screenshot of the page (and of the first widget) goes to ``screenshots/``
   (``NN_name-FAILED.png`` when the test failed);
7. the course notebook on disk is unchanged.
"""

from __future__ import annotations

import os
import re
import time

import nbformat
import pytest
from labdriver import NOTEBOOK_DIR, Notebook
from widget_slices import slice_notebook

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob(os.environ.get("COURSE_NOTEBOOKS", "*.ipynb")))
RUN_TIMEOUT = float(os.environ.get("COURSE_BROWSER_TIMEOUT", "600"))


def _screenshot(target, path) -> None:
    try:
        target.screenshot(path=str(path), timeout=15_000)
    except Exception as error:  # a screenshot must never hide the real failure
        print(f"screenshot {path.name} failed: {error}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_in_jupyterlab(path, lab_server, browser, screenshots):
    for stale in (f"{path.stem}.png", f"{path.stem}-FAILED.png", f"{path.stem}-widget.png"):
        (screenshots / stale).unlink(missing_ok=True)
    on_disk = path.read_bytes()
    sliced = lab_server.root_dir / path.name
    nbformat.write(slice_notebook(path), sliced)
    kernel = nbformat.reads(on_disk.decode(), as_version=4).metadata.get("kernelspec", {}).get("name")
    assert kernel in lab_server.api("GET", "/api/kernelspecs")["kernelspecs"], (
        f"{path.name} asks for kernel {kernel!r}, which JupyterLab does not have (make setup registers it)"
    )

    page = browser.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    notebook = Notebook(page, lab_server, sliced.relative_to(lab_server.root_dir).as_posix())
    passed = False
    try:
        notebook.open()
        dialogs = page.locator(".jp-Dialog")
        assert dialogs.count() == 0, f"a dialog opened with the notebook: {dialogs.first.text_content()}"
        sessions = [s for s in lab_server.api("GET", "/api/sessions") if s["path"].endswith(path.name)]
        assert [s["kernel"]["name"] for s in sessions] == [kernel], f"kernel sessions for {path.name}: {sessions}"

        notebook.clear_outputs()
        seconds = notebook.run_all(RUN_TIMEOUT)
        print(f"{path.name}: Run All of its widget slice took {seconds:.1f} s in JupyterLab")

        prompts = notebook.prompts()
        counts = [int(m.group(1)) if (m := re.fullmatch(r"\[(\d+)\]:?", p)) else p for p in prompts]
        errors = notebook.errors()
        assert not errors, f"{path.name}: {len(errors)} cell(s) show an error:\n" + "\n---\n".join(
            e[-1500:] for e in errors
        )
        assert counts == list(range(1, len(prompts) + 1)), f"{path.name}: not every cell ran in order: {prompts}"
        broken = notebook.panel.get_by_text("Error displaying widget")
        assert broken.count() == 0, f"{path.name}: a widget failed to display"
        twice = [n for n, ids in enumerate(notebook.widget_views(), 1) if len(ids) != len(set(ids))]
        assert not twice, (
            f"{path.name}: code cell(s) {twice} show the same widget twice "
            "(show(...) displays it and returns it: end the line with ';')"
        )

        boxes = notebook.widget_boxes()
        operated = []
        for index in range(boxes.count()):
            changes = notebook.operate_widget(boxes.nth(index))
            tried = "; ".join(
                f"{c.kind} {c.value_before} → {c.value_after} in {c.steps} step(s): text "
                f"{'changed' if c.text_changed else 'same'}, image {'changed' if c.image_changed else 'same'}"
                for c in changes
            )
            where = f"{path.name}, widget {index + 1} ({tried})"
            first = changes[0]
            assert first.before["text"] or first.before["images"], f"{where}: the widget shows nothing"
            if first.before["text"]:
                assert any(c.text_changed for c in changes), f"{where}: its text never changed"
            if first.before["images"]:
                assert any(c.image_changed for c in changes), f"{where}: its image never changed"
            assert not notebook.errors(), f"{where}: an update raised:\n{notebook.errors()[-1][-1500:]}"
            operated.append(tried)
            if index == 0:
                _screenshot(boxes.nth(index), screenshots / f"{path.stem}-widget.png")
        print(
            f"{path.name}: {len(prompts)} code cells in its widget slice; {len(operated)} widget(s):",
            *operated,
            sep="\n  ",
        )
        assert not page_errors, f"{path.name}: uncaught errors in the page: {page_errors}"
        passed = True
    finally:
        _screenshot(page, screenshots / f"{path.stem}{'' if passed else '-FAILED'}.png")
        page.close()
        lab_server.shutdown_kernels()
        time.sleep(0.5)
    assert path.read_bytes() == on_disk, f"{path.name} was changed on disk while the suite ran"
