"""Widget plumbing: the update logic of every widget is a plain function (tested directly); this
module turns one into a live view, and keeps a registry the latency benchmark walks.

An update function takes keyword arguments (the control values) and returns a ``View``: a text or
HTML summary and/or a matplotlib figure. Register it where it is defined::

    @register_widget("02_smart_resize", resize_view_defaults, [{"height": 400}, {"height": 2000}])
    def resize_view(height=..., width=..., ...) -> View: ...

and show it in the notebook with ``show(resize_view, height=IntSlider(...), ...)``.
"""

from __future__ import annotations

import gc
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import helpers
from helpers.plots import figure_to_png


@dataclass
class View:
    """What a widget shows: ``html`` (or plain ``text``) above an optional ``figure``."""

    text: str = ""
    html: str = ""
    figure: object | None = None
    data: dict = field(default_factory=dict)  # numbers the view computed, for tests


@dataclass
class RegisteredWidget:
    notebook: str
    update: Callable[..., View]
    defaults: dict
    variations: list[dict]


#: name → RegisteredWidget, filled by ``register_widget`` as helper modules are imported.
REGISTRY: dict[str, RegisteredWidget] = {}


def register_widget(notebook: str, defaults: dict, variations: list[dict]):
    """Record an update function with its default controls and some other settings to try."""

    def decorate(update):
        REGISTRY[f"{update.__module__}.{update.__name__}"] = RegisteredWidget(
            notebook, update, dict(defaults), variations
        )
        return update

    return decorate


def load_registry() -> dict[str, RegisteredWidget]:
    """Import every ``helpers`` module, so that each registers its widgets; return the registry."""
    for module in pkgutil.walk_packages(helpers.__path__, "helpers."):
        importlib.import_module(module.name)
    return REGISTRY


def render(view: View) -> tuple[str, bytes | None]:
    """The finished output of a view: its HTML and the PNG of its figure."""
    html = view.html or (f"<pre>{view.text}</pre>" if view.text else "")
    return html, (figure_to_png(view.figure) if view.figure is not None else None)


_heap_frozen = False


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's sight (once per process).

    With torch and transformers imported a kernel tracks ~450,000 objects, and a full collection
    over them takes ~0.5 s: it lands inside whichever slider move triggers it. Freezing the heap
    after the imports removes those pauses (measured by scripts/widget_latency.py).
    """
    global _heap_frozen
    if not _heap_frozen:
        gc.collect()
        gc.freeze()
        _heap_frozen = True


def show(update: Callable[..., View], **controls):
    """Display ``update`` driven by ipywidgets ``controls`` (name → widget); renders once now.

    Returns the ``VBox`` (controls above an output area) so notebooks can also lay it out.
    The first call also freezes the heap (``freeze_heap``) so slider moves don't hit GC pauses.
    """
    import ipywidgets as widgets
    from IPython.display import HTML, Image, display

    freeze_heap()
    output = widgets.Output()

    def refresh(**values):
        output.clear_output(wait=True)
        with output:  # an update that raises shows its traceback here, where the reader looks (and the browser suite)
            html, png = render(update(**values))
            if html:
                display(HTML(html))
            if png is not None:
                display(Image(png))

    def on_change(_change=None):
        refresh(**{name: control.value for name, control in controls.items()})

    for control in controls.values():
        control.observe(on_change, names="value")
    on_change()
    box = widgets.VBox([widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap")), output])
    display(box)
    return box
