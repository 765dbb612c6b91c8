"""Widget latency: how long a reader waits after moving a control, for every widget in the course.

    .venv/bin/python scripts/widget_latency.py [--repeats 5] [--browser 02_smart_resize]
                                               [--presses 20] [--markdown README.md]

1. In this process: import every ``helpers`` module (each registers its widgets in
   ``helpers.widgets.REGISTRY``); for each widget, render its defaults once (the notebook does that
   when the cell runs: not timed), then time ``render(update(**controls))`` (the update function and
   its figure rendered to PNG, exactly what ``show`` does on a change) over its defaults and every
   variation, ``--repeats`` passes. Median and worst are over all those runs; the first visit of
   each variation counts (caches that depend on the controls get no free pass).
2. In the browser (``--browser NOTEBOOK``, '' to skip): JupyterLab in Chromium as in the browser
   suite, Run All, then ``--presses`` arrow-key presses on the first slider of the first widget,
   each timed in the page from keydown to the changed output decoded (kernel round trip, update,
   PNG, widget message, DOM). Presses that leave the output unchanged are not counted.

Targets (DESIGN, helper conventions): median ≤ 150 ms, worst ≤ 400 ms on this 2-core machine.
The machine is shared, so the load average at the start is printed with the results.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEDIAN_TARGET_MS, WORST_TARGET_MS = 150.0, 400.0

os.environ.setdefault("QWENVL_BLOCK_NETWORK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(REPO))


def time_widget(widget, repeats: int) -> dict:
    """Times (ms) of render(update(**controls)) over defaults + variations, ``repeats`` passes."""
    from helpers.widgets import render

    settings = [dict(widget.defaults)] + [{**widget.defaults, **v} for v in widget.variations]
    start = time.perf_counter()
    render(widget.update(**settings[0]))  # what the cell does when it is run: not timed
    first_render = (time.perf_counter() - start) * 1000
    runs = []  # (ms, setting index, pass)
    for repeat in range(repeats):
        for index, controls in enumerate(settings):
            start = time.perf_counter()
            render(widget.update(**controls))
            runs.append(((time.perf_counter() - start) * 1000, index, repeat + 1))
    times = sorted(ms for ms, _, _ in runs)
    worst, index, repeat = max(runs)
    return {
        "settings": len(settings),
        "runs": len(runs),
        "median": statistics.median(times),
        "p90": times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
        "worst": worst,
        "worst_at": f"{'defaults' if index == 0 else f'variation {index}'}, pass {repeat}",
        "first_render": first_render,
    }


def browser_latency(notebook: str, presses: int) -> dict:
    """Key press → changed output, in JupyterLab in Chromium, on the first slider of ``notebook``."""
    from labdriver import NOTEBOOK_DIR, LabServer, Notebook, chromium  # scripts/labdriver.py

    path = NOTEBOOK_DIR / f"{notebook}.ipynb"
    with LabServer(NOTEBOOK_DIR.parent) as server, chromium() as context:
        page = context.new_page()
        lab = Notebook(page, server, path.relative_to(server.root_dir).as_posix())
        lab.open()
        lab.clear_outputs()
        lab.run_all(900)
        box = lab.widget_boxes().first
        kind = lab.controls(box)[0][0]
        if not kind.startswith("slider"):
            raise SystemExit(f"{notebook}: its first widget has no slider")
        samples, unchanged = [], 0
        for _ in range(presses):
            change = lab.change_control(box, max_steps=1, timeout=5.0, measure=True)
            if change.latency_ms is None:
                unchanged += 1
            else:
                samples.append(change.latency_ms)
        page.close()
    if not samples:
        raise SystemExit(f"{notebook}: no press changed the output")
    return {
        "notebook": notebook,
        "control": kind,
        "presses": presses,
        "counted": len(samples),
        "unchanged": unchanged,
        "median": statistics.median(samples),
        "worst": max(samples),
    }


def verdict(median: float, worst: float) -> str:
    return "yes" if median <= MEDIAN_TARGET_MS and worst <= WORST_TARGET_MS else "**no**"


def report(rows: list[dict], browser: dict | None, command: str, load: tuple[float, ...]) -> str:
    lines = [
        "## Widget latency",
        "",
        f"Made with `{command}` on {datetime.date.today().isoformat()}: {os.cpu_count()} CPU cores "
        f"({platform.machine()}), Python {platform.python_version()}, load average {load[0]:.1f} when it "
        "started (the machine is shared, so timings are noisy).",
        "",
        "Time from a value change to the finished output: the widget's update function plus its figure "
        f"rendered to PNG, as `helpers.widgets.show` does it. Targets: median ≤ {MEDIAN_TARGET_MS:.0f} ms, "
        f"worst ≤ {WORST_TARGET_MS:.0f} ms.",
        "",
        "| notebook | widget | settings × passes | median (ms) | p90 (ms) | worst (ms) | worst at | first render (ms) | meets target |",
        "|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['notebook']} | `{row['name']}` | {row['settings']} × {row['runs'] // row['settings']} | "
            f"{row['median']:.0f} | {row['p90']:.0f} | {row['worst']:.0f} | {row['worst_at']} | "
            f"{row['first_render']:.0f} | {verdict(row['median'], row['worst'])} |"
        )
    if rows:
        slowest = max(rows, key=lambda r: r["worst"])
        lines += [
            "",
            f"Slowest widget (worst case): `{slowest['name']}` ({slowest['notebook']}), "
            f"median {slowest['median']:.0f} ms, worst {slowest['worst']:.0f} ms.",
        ]
    lines += [
        "",
        '"settings" are the widget\'s defaults and the variations it registers; "worst at" says '
        'which setting and pass gave the worst time (pass 1 is a setting\'s first visit). "first render" '
        "is the call the notebook makes when the cell runs (cold caches); it is not part of the median or worst.",
    ]
    if browser:
        lines += [
            "",
            f"In the browser ({browser['notebook']}, JupyterLab in Chromium, {browser['control']}): "
            f"{browser['counted']} arrow-key presses that changed the output (of {browser['presses']}), "
            f"key press → new output decoded: median {browser['median']:.0f} ms, worst {browser['worst']:.0f} ms "
            f"(meets target: {verdict(browser['median'], browser['worst'])}). This adds the kernel round trip, "
            "the widget messages and the page's rendering to the numbers above.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="passes over defaults + variations (default 5)")
    parser.add_argument("--browser", default="02_smart_resize", help="notebook to time in the browser ('' to skip)")
    parser.add_argument("--presses", type=int, default=20, help="arrow-key presses timed in the browser")
    parser.add_argument("--only", default="", help="time only widgets whose name contains this")
    parser.add_argument(
        "--markdown",
        type=Path,
        help="also write the table to this file (in README.md: between its performance markers)",
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="skip helpers.widgets.freeze_heap(), which helpers.widgets.show() runs before the first "
        "render (what-if: the worst cases become full garbage collections walking the ~450k "
        "objects torch and transformers leave behind)",
    )
    args = parser.parse_args(argv)
    command = "python scripts/widget_latency.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    load = os.getloadavg()

    from helpers.widgets import load_registry

    registry = load_registry()
    if not args.no_gc_freeze:
        from helpers.widgets import freeze_heap

        freeze_heap()  # as show() does in the notebooks
    rows = []
    for name, widget in sorted(registry.items(), key=lambda item: (item[1].notebook, item[0])):
        if args.only not in name:
            continue
        timing = time_widget(widget, args.repeats)
        rows.append({"name": name.removeprefix("helpers."), "notebook": widget.notebook, **timing})
        print(
            f"{widget.notebook:24s} {name:45s} median {timing['median']:7.1f} ms  worst {timing['worst']:7.1f} ms "
            f"({timing['worst_at']})",
            flush=True,
        )
    browser = browser_latency(args.browser, args.presses) if args.browser else None
    if browser:
        print(
            f"browser {browser['notebook']}: median {browser['median']:.1f} ms, worst {browser['worst']:.1f} ms "
            f"({browser['counted']} of {browser['presses']} presses changed the output)",
            flush=True,
        )
    text = report(rows, browser, command, load)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text)


def write_markdown(path: Path, text: str) -> None:
    """Write the table to ``path``; in a file with ``<!-- performance -->`` … ``<!-- /performance -->``
    markers (the README), replace only what stands between them."""
    start, end = "<!-- performance -->", "<!-- /performance -->"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        head, rest = old.split(start, 1)
        text = head + start + "\n" + text.rstrip("\n") + "\n" + end + rest.split(end, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
