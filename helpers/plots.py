"""One figure style for the whole course, and the small plotting pieces every notebook uses.

Area-specific figures live next to the logic they draw (``helpers.vision``, ``helpers.chat``, …);
they start from ``new_figure`` so that all figures look alike.
"""

from __future__ import annotations

import io

import matplotlib

import matplotlib.pyplot as plt

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
    """Apply the course style to matplotlib (notebooks call it once, in their first cell)."""
    matplotlib.rcParams.update(STYLE)


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


def close(figure) -> None:
    """Release a pyplot figure (``new_figure`` figures need nothing)."""
    plt.close(figure)
