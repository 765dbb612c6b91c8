"""The README's course map: one real picture per notebook, produced by the course itself.

    .venv/bin/python -m pytest tests/browser          # writes screenshots/NN_name-widget.png
    .venv/bin/python scripts/course_map.py            # → assets/course_map/*.png, README.md

For each ``notebooks/*.ipynb`` the picture is, in order of preference:

1. the screenshot of its first widget in JupyterLab, taken by the browser suite after it moved a
   control (``screenshots/NN_name-widget.png``): what the reader sees and plays with;
2. otherwise the first plot in the committed notebook's outputs.

Pictures are shrunk to at most ``WIDTH`` pixels wide and stored as small palette PNGs. The README's
course-map block (between ``<!-- course-map-pictures -->`` markers) shows them in a table.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import nbformat
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
from labdriver import NOTEBOOK_DIR, SCREENSHOTS  # noqa: E402  (scripts/labdriver.py: the browser suite's folders)

ASSETS = REPO / "assets" / "course_map"
README = REPO / "README.md"
START, END = "<!-- course-map-pictures -->", "<!-- /course-map-pictures -->"
WIDTH = 560


def first_plot(notebook) -> tuple[bytes, int] | None:
    """The first image/png output of the notebook and its code cell's number (1-based)."""
    number = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        number += 1
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                return base64.b64decode(png), number
    return None


def title(notebook) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("#"):
            heading = cell.source.lstrip().splitlines()[0].lstrip("#").strip()
            return heading.split("·", 1)[-1].strip()
    return ""


def small_png(data: bytes) -> bytes:
    """Shrink to ``WIDTH`` wide at most, as a 128-colour palette PNG."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.width > WIDTH:
        image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    buffer = io.BytesIO()
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        shot = SCREENSHOTS / f"{path.stem}-widget.png"
        if shot.exists():
            data, source = shot.read_bytes(), "its widget in JupyterLab (browser suite screenshot)"
        elif (plot := first_plot(notebook)) is not None:
            data, source = plot[0], f"the plot of its code cell {plot[1]}"
        else:
            print(f"{path.name}: no widget screenshot and no plot: no picture")
            continue
        target = ASSETS / f"{path.stem}.png"
        target.write_bytes(small_png(data))
        rows.append((path, title(notebook), target, source))
        print(f"{path.name}: {target.relative_to(REPO)} ({target.stat().st_size // 1024} KB) from {source}")
    write_readme_gallery(rows)


def write_readme_gallery(rows, columns: int = 3) -> None:
    """Replace the README's block between the course-map markers with a table of thumbnails."""
    cells = [
        f"[**{path.stem.split('_', 1)[0]}** {heading}<br>"
        f'<img src="{target.relative_to(REPO).as_posix()}" width="260">]({path.relative_to(REPO).as_posix()})'
        for path, heading, target, _source in rows
    ]
    lines = [
        "## What each notebook looks like",
        "",
        "One real picture per notebook, produced by the course itself: its first widget as the browser",
        "suite saw it in JupyterLab, or else its first plot (`pytest tests/browser`, then",
        "`python scripts/course_map.py`, remakes them).",
        "",
        "| " * columns + "|",
        "|---" * columns + "|",
    ]
    for start in range(0, len(cells), columns):
        row = cells[start : start + columns]
        lines.append("| " + " | ".join(row + [""] * (columns - len(row))) + " |")
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + START + "\n" + "\n".join(lines) + "\n" + END + tail)
    print(f"updated the course map in {README.relative_to(REPO)}")


if __name__ == "__main__":
    main()
