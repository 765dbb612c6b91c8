"""The shared figure style, the widget plumbing and the network guard."""

import matplotlib
import pytest

from helpers import plots, widgets
from helpers.netguard import _is_local


def test_new_figure_uses_the_course_style_and_renders():
    figure, axes = plots.new_figure(2, 1, width=4, height=2)
    assert len(axes) == 2 and figure.get_dpi() == plots.STYLE["figure.dpi"]
    assert plots.figure_to_png(figure).startswith(b"\x89PNG")


def test_stage_diagram_draws_one_box_per_stage():
    figure = plots.stage_diagram([("a", ["1"]), ("b", ["2", "3"]), ("c", [])])
    boxes = [p for p in figure.axes[0].patches if isinstance(p, matplotlib.patches.FancyBboxPatch)]
    assert len(boxes) == 3


def test_registered_widget_renders_html_and_png():
    @widgets.register_widget("test", {"n": 2}, [{"n": 3}])
    def square(n):
        figure, axes = plots.new_figure(width=2, height=2)
        axes.bar([0], [n * n])
        return widgets.View(text=f"{n}² = {n * n}", figure=figure, data={"value": n * n})

    entry = widgets.REGISTRY[f"{__name__}.square"]
    view = entry.update(**entry.defaults)
    html, png = widgets.render(view)
    assert view.data["value"] == 4 and "2² = 4" in html and png.startswith(b"\x89PNG")
    del widgets.REGISTRY[f"{__name__}.square"]


def test_every_registered_widget_renders_its_defaults_and_variations():
    """What the browser suite's slider moves reach, without a browser: every course widget, at its
    defaults and at each registered variation, renders a view instead of raising (a variation may be a
    refusal on purpose, which is a view too; the defaults never are)."""
    registry = widgets.load_registry()
    assert {entry.notebook for entry in registry.values()} >= {"01_chat_template", "02_smart_resize", "10_sft"}
    for name, entry in registry.items():
        for number, controls in enumerate([entry.defaults] + [{**entry.defaults, **v} for v in entry.variations]):
            view = entry.update(**controls)
            html, png = widgets.render(view)
            assert html or png, (name, controls)
            assert number > 0 or "error" not in view.data, (name, view.data.get("error"))


def test_show_builds_controls_and_refreshes(monkeypatch):
    import ipywidgets

    # show() freezes the kernel's heap once (gc.freeze); in pytest that would freeze the whole test process
    frozen = []
    monkeypatch.setattr(widgets, "freeze_heap", lambda: frozen.append(True))
    calls = []

    def update(n):
        calls.append(n)
        return widgets.View(text=str(n))

    slider = ipywidgets.IntSlider(value=1, min=0, max=5)
    box = widgets.show(update, n=slider)
    slider.value = 4
    assert calls == [1, 4] and isinstance(box, ipywidgets.VBox) and frozen == [True]


@pytest.mark.parametrize(
    "host, local",
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("10.0.0.1", False),
        ("huggingface.co", False),
        ("8.8.8.8", False),
    ],
)
def test_only_loopback_counts_as_local(host, local):
    assert _is_local(host) is local
