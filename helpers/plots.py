"""One figure style for the whole course, and the small plotting pieces every notebook uses.

Area-specific figures live next to the logic they draw (``helpers.vision``, ``helpers.chat``, …);
they start from ``new_figure`` so that all figures look alike.
"""

from __future__ import annotations

import io

import matplotlib
import matplotlib.patches

#: Colours used across the course, by meaning (colour-blind safe, Okabe–Ito).
COLOURS = {
    "text": "#0072B2",
    "special": "#E69F00",
    "image": "#009E73",
    "video": "#CC79A7",
    "loss": "#D55E00",
    "pad": "#999999",
    "accent": "#56B4E9",
    "highlight": "#F0E442",
}

STYLE = {
    "figure.dpi": 90,
    "savefig.dpi": 90,
    "figure.facecolor": "white",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "font.size": 9,
    "legend.frameon": False,
    "image.interpolation": "nearest",
}


def use_course_style() -> None:
    """Apply the course style to matplotlib (notebooks call it once, in their first cell).

    In a notebook it also turns on inline figures, so a returned ``Figure`` shows as a picture.
    """
    matplotlib.rcParams.update(STYLE)
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and hasattr(shell, "kernel"):
        shell.run_line_magic("matplotlib", "inline")
        matplotlib.rcParams.update(STYLE)  # %matplotlib inline resets a few rc values


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 3.6, **kwargs):
    """A figure in the course style, not attached to pyplot's global state (safe in widgets)."""
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(width, height), layout="constrained")
        axes = figure.subplots(nrows, ncols, squeeze=True, **kwargs)
    return figure, axes


def figure_to_png(figure) -> bytes:
    """Render a figure to PNG bytes (what a widget shows, and what the latency benchmark times)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def stage_diagram(stages: list[tuple[str, list[str]]], width: float = 11.0, height: float = 2.6):
    """Boxes joined by arrows, one per stage: ``[(title, [line, …]), …]`` (00_quickstart's map of
    the pipeline, with the real shapes written in the boxes)."""
    figure, axes = new_figure(width=width, height=height)
    axes.set_axis_off()
    axes.set_xlim(0, len(stages))
    axes.set_ylim(0, 1)
    palette = [COLOURS["text"], COLOURS["special"], COLOURS["image"], COLOURS["video"], COLOURS["loss"]]
    for index, (title, lines) in enumerate(stages):
        colour = palette[index % len(palette)]
        axes.add_patch(
            matplotlib.patches.FancyBboxPatch(
                (index + 0.06, 0.08),
                0.78,
                0.84,
                boxstyle="round,pad=0.02",
                facecolor=colour,
                alpha=0.15,
                edgecolor=colour,
                linewidth=1.5,
            )
        )
        axes.text(index + 0.45, 0.84, title, ha="center", va="top", fontsize=10, fontweight="bold", color=colour)
        axes.text(index + 0.45, 0.66, "\n".join(lines), ha="center", va="top", fontsize=8, family="monospace")
        if index + 1 < len(stages):
            axes.annotate(
                "",
                xy=(index + 1.04, 0.5),
                xytext=(index + 0.88, 0.5),
                arrowprops=dict(arrowstyle="->", lw=1.5, color="#444444"),
            )
    return figure
