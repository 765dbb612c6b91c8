"""JupyterLab on the course, driven from Debian's Chromium the way a reader uses it.

Used by the browser suite (``tests/browser/``) and by the latency benchmark
(``scripts/widget_latency.py``). The facts it relies on (flags, selectors) are in DESIGN §6:

- ``LabServer``: ``jupyter lab`` with its own HOME on a free loopback port, no token, autosave off
  (the committed notebooks are never written), the network blocked for kernels
  (``QWENVL_BLOCK_NETWORK=1``); ``stop()`` shuts kernels down and ends the server's process group.
- ``chromium()``: a persistent Playwright context on ``/usr/bin/chromium`` (never a downloaded
  browser), closed on exit.
- ``Notebook``: open a notebook, clear outputs, Run All from the Run menu, wait for the kernel,
  read prompts / errors, move a noUiSlider with the keyboard (or click / edit another control)
  and wait for the widget's output to change.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The notebooks the suite opens (``COURSE_NOTEBOOK_DIR``; the server serves the folder above it).
NOTEBOOK_DIR = Path(os.environ.get("COURSE_NOTEBOOK_DIR", REPO / "notebooks")).resolve()
#: Where screenshots go (``COURSE_SCREENSHOTS``; ``screenshots/`` is ignored by git).
SCREENSHOTS = Path(os.environ.get("COURSE_SCREENSHOTS", REPO / "screenshots")).resolve()
CHROMIUM = os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # the server is on loopback; ignore any proxy in the environment
]
VIEWPORT = {"width": 1280, "height": 1000}

# Settings a fresh HOME starts with: never write notebooks, never look for news or updates.
USER_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"checkForUpdates": False, "fetchNews": "false"},
}

PANEL = ".jp-NotebookPanel:visible"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
_WIDGET_VIEWS_JS = r"""() => {
  const cells = [];
  for (const cell of window.jupyterapp.shell.currentWidget.content.model.cells) {
    if (cell.type !== 'code') continue;
    const ids = [];
    for (let j = 0; j < cell.outputs.length; j++) {
      const view = (cell.outputs.get(j).toJSON().data || {})['application/vnd.jupyter.widget-view+json'];
      if (view) ids.push(view.model_id);
    }
    cells.push(ids);
  }
  return cells;
}"""

# JupyterLab renders an ``error`` output like stderr text (same mime type), so errors are read from
# the notebook's model (the app is exposed with --LabApp.expose_app_in_browser, as Galata, Lab's own
# Playwright framework, does), and tracebacks inside widget Output areas from the page.
_ERRORS_JS = r"""() => {
  const found = [];
  const panel = window.jupyterapp.shell.currentWidget;
  for (const cell of panel.content.model.cells) {
    if (cell.type !== 'code') continue;
    for (let j = 0; j < cell.outputs.length; j++) {
      const output = cell.outputs.get(j).toJSON();
      if (output.output_type === 'error') {
        const trace = (output.traceback || []).join('\n').replace(/\x1b\[[0-9;]*m/g, '');
        found.push(`cell [${cell.executionCount}]: ${output.ename}: ${output.evalue}
${trace}`);
      }
    }
  }
  for (const out of panel.node.querySelectorAll(
         '.widget-output .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')) {
    if (/Traceback|\w+(Error|Exception):/.test(out.textContent)) found.push('in a widget: ' + out.textContent);
  }
  return found;
}"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: new session, and SIGTERM when the process that started us dies."""
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LabServer:
    """``jupyter lab`` serving ``root_dir`` from a throwaway HOME; use as a context manager."""

    def __init__(self, root_dir: Path = REPO, *, ready_timeout: float = 90.0):
        self.root_dir = Path(root_dir).resolve()
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = Path(tempfile.mkdtemp(prefix="course-lab-home-"))
        self.log_path = self.home / "jupyter.log"
        self.process: subprocess.Popen | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> LabServer:
        for name, values in USER_SETTINGS.items():
            path = self.home / ".jupyter" / "lab" / "user-settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = dict(os.environ)
        env.update(
            HOME=str(self.home),
            QWENVL_BLOCK_NETWORK="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            JUPYTER_RUNTIME_DIR=str(self.home / "runtime"),
            # Readers see inline figures: undo the Agg backend the unit tests set.
            MPLBACKEND="module://matplotlib_inline.backend_inline",
        )
        for leaked in (
            "JUPYTER_CONFIG_DIR",
            "JUPYTERLAB_SETTINGS_DIR",
            "JUPYTERLAB_WORKSPACES_DIR",
            "PYTEST_CURRENT_TEST",
        ):
            env.pop(leaked, None)
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={self.root_dir}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.expose_app_in_browser=True",
        ]
        if os.geteuid() == 0:
            command.append("--allow-root")
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command,
            cwd=self.root_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.api("GET", "/api/status")
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"jupyter lab not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Shut every kernel down, then end the server (SIGTERM, then SIGKILL); always safe to call."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.shutdown_kernels()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- REST -----------------------------------------------------------------------------------
    def api(self, method: str, path: str, timeout: float = 10.0):
        request = urllib.request.Request(self.url + path, method=method)
        with _DIRECT.open(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernels(self) -> list[dict]:
        return self.api("GET", "/api/kernels")

    def shutdown_kernels(self) -> None:
        """Shut down every running kernel (each test leaves the machine's 2 cores free again)."""
        for kernel in self.kernels():
            with contextlib.suppress(Exception):
                self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def chromium(profile_dir: Path | None = None):
    """A Playwright browser context on Debian's Chromium (DESIGN §6 flags); closed on exit."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: apt-get update && apt-get install -y chromium")
    own_dir = profile_dir is None
    profile = Path(tempfile.mkdtemp(prefix="course-chromium-")) if own_dir else Path(profile_dir)
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(profile),
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport=VIEWPORT,
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        if own_dir:
            shutil.rmtree(profile, ignore_errors=True)


# -- one notebook in the browser -----------------------------------------------------------------
_STATE_JS = """(out) => ({
  text: Array.from(out.querySelectorAll('.jp-OutputArea-output:not(:has(img))'))
              .map(e => e.textContent).join('\\n').trim(),
  images: Array.from(out.querySelectorAll('img')).map(i => i.getAttribute('src') || ''),
  loaded: Array.from(out.querySelectorAll('img')).every(i => i.complete && i.naturalWidth > 0),
})"""

# Resolves with the time (ms, page clock) from the next keydown / mousedown / change to the output's first finished
# change: different text or image, every image decoded (null after ``timeoutMs``). Installed before the
# key is pressed; wrapped in an object so that installing it does not wait for it.
_WATCH_JS = """(out, [before, timeoutMs]) => ({done: new Promise((resolve) => {
  let start = null;
  setTimeout(() => { observer.disconnect(); clearInterval(timer); resolve(null); }, timeoutMs);
  const state = () => ({
    text: Array.from(out.querySelectorAll('.jp-OutputArea-output:not(:has(img))'))
                .map(e => e.textContent).join('\\n').trim(),
    images: Array.from(out.querySelectorAll('img')),
  });
  for (const type of ['keydown', 'mousedown', 'change']) {
    document.addEventListener(type, () => { if (start === null) start = performance.now(); }, {capture: true, once: true});
  }
  const check = () => {
    const now = state();
    const srcs = now.images.map(i => i.getAttribute('src') || '');
    const changed = now.text !== before.text || JSON.stringify(srcs) !== JSON.stringify(before.images);
    const complete = srcs.length === before.images.length && now.images.every(i => i.complete && i.naturalWidth > 0)
                     && (before.text === '' || now.text !== '');
    if (start !== null && changed && complete) {
      observer.disconnect(); clearInterval(timer);
      Promise.all(now.images.map(i => i.decode().catch(() => null)))
        .then(() => resolve(performance.now() - start));
    }
  };
  const observer = new MutationObserver(check);
  observer.observe(out, {subtree: true, childList: true, attributes: true, characterData: true});
  const timer = setInterval(check, 20);
})})"""


@dataclass
class ControlChange:
    """What operating one control did: its value before/after, and the output's text and images."""

    kind: str
    value_before: str
    value_after: str
    before: dict
    after: dict
    steps: int
    latency_ms: float | None

    @property
    def text_changed(self) -> bool:
        return bool(self.before["text"]) and self.after["text"] != self.before["text"]

    @property
    def image_changed(self) -> bool:
        return bool(self.before["images"]) and self.after["images"] != self.before["images"] and self.after["loaded"]


class Notebook:
    """One notebook open in JupyterLab, in its own page."""

    def __init__(self, page, server: LabServer, relpath: str):
        self.page = page
        self.server = server
        self.relpath = relpath
        self.panel = page.locator(PANEL)

    def open(self, timeout: float = 120.0) -> None:
        self.page.goto(f"{self.server.url}/lab/tree/{self.relpath}?reset", timeout=timeout * 1000)
        self.panel.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=timeout * 1000)
        self.wait_idle(timeout)

    # -- kernel ---------------------------------------------------------------------------------
    def kernel_status(self) -> str | None:
        indicator = self.panel.locator(".jp-Notebook-ExecutionIndicator")
        if indicator.count() == 0:
            return None
        return indicator.first.get_attribute("data-status")

    def kernel_name(self) -> str:
        return self.panel.locator(".jp-KernelName").first.text_content().strip()

    def wait_idle(self, timeout: float, *, all_prompts_done: bool = False, interval_ms: int = 500) -> None:
        """Until the kernel is idle at two looks ``interval_ms`` apart (and, if asked, no cell shows ``[*]``)."""
        deadline = time.monotonic() + timeout
        idle_looks = 0
        while True:
            idle = self.kernel_status() == "idle" and not (all_prompts_done and self.busy_cells())
            idle_looks = idle_looks + 1 if idle else 0
            if idle_looks >= 2:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.relpath}: kernel not idle after {timeout:.0f} s (status {self.kernel_status()!r}, "
                    f"prompts {self.prompts()})"
                )
            self.page.wait_for_timeout(interval_ms)

    # -- cells ----------------------------------------------------------------------------------
    def prompts(self) -> list[str]:
        """The execution prompt of each code cell as shown: ``[3]:``, ``[*]:`` or ``[ ]:``."""
        return [p.strip() for p in self.panel.locator(".jp-CodeCell .jp-InputArea-prompt").all_text_contents()]

    def busy_cells(self) -> list[int]:
        return [i for i, p in enumerate(self.prompts(), 1) if "*" in p]

    def errors(self) -> list[str]:
        """Error outputs in the notebook, as text: ``error`` outputs of its cells, and tracebacks
        printed inside widget outputs (which live in widget state, not in the cells)."""
        return self.page.evaluate(_ERRORS_JS)

    def focus(self) -> None:
        """Click the notebook's first cell prompt, so that the notebook is JupyterLab's current widget."""
        self.panel.locator(".jp-Cell .jp-InputPrompt").first.click()

    def cell_outputs(self) -> list[list[dict]]:
        """For each code cell, its outputs as nbformat JSON (from the notebook's model)."""
        return self.page.evaluate("""() => Array.from(window.jupyterapp.shell.currentWidget.content.model.cells)
            .filter(c => c.type === 'code')
            .map(c => Array.from({length: c.outputs.length}, (_, j) => c.outputs.get(j).toJSON()))""")

    def widget_views(self) -> list[list[str]]:
        """For each code cell, the model ids of the widgets its outputs display."""
        return self.page.evaluate(_WIDGET_VIEWS_JS)

    def menu(self, title: str, command: str) -> None:
        """Click ``title`` in the menu bar, then the (enabled) item that runs ``command``."""
        self.focus()
        self.page.locator(".lm-MenuBar-itemLabel", has_text=title).first.click()
        item = self.page.locator(f'.lm-Menu-item[data-command="{command}"]:not(.lm-mod-disabled)').first
        item.wait_for(timeout=30_000)
        item.click()

    def clear_outputs(self) -> None:
        self.menu("Edit", "editmenu:clear-all")
        self.page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')).length === 0",
            timeout=30_000,
        )

    def run_all(self, timeout: float) -> float:
        """Run > Run All Cells, and wait until every cell has run; returns the wall time in s."""
        start = time.monotonic()
        for _attempt in range(3):
            self.menu("Run", "runmenu:run-all")
            # Run All queues every cell at once (``[*]``): wait for that, so "idle" below means "done".
            # Nothing queued after 10 s means the click was lost (it happens while Lab is still
            # settling): clicking again cannot run anything twice.
            with contextlib.suppress(Exception):
                self.page.wait_for_function(
                    """() => Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt'))
                             .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))""",
                    timeout=10_000,
                )
                break
        else:
            raise AssertionError(
                f"{self.relpath}: Run > Run All Cells started nothing (3 tries); prompts {self.prompts()}"
            )
        self.wait_idle(timeout, all_prompts_done=True)
        return time.monotonic() - start

    # -- widgets --------------------------------------------------------------------------------
    def widget_boxes(self):
        """``show(...)`` boxes: a VBox holding its controls (an HBox) and its view (an Output)."""
        return self.panel.locator(".widget-vbox:has(> .widget-output):has(> .widget-hbox)")

    def output_state(self, output) -> dict:
        return output.evaluate(_STATE_JS)

    def controls(self, box) -> list[tuple[str, Callable[[], str], Callable[[], None]]]:
        """The controls of ``box`` the suite can operate, sliders first: (kind, read value, one step)."""
        found = []
        for n in range(box.locator(".widget-slider").count()):
            slider = box.locator(".widget-slider").nth(n)
            handle, readout = slider.locator(".noUi-handle").first, slider.locator(".widget-readout").first
            now, low, high = (float(handle.get_attribute(f"aria-value{k}") or 0) for k in ("now", "min", "max"))
            if low == high:  # a slider with a single value (say, one recorded step) cannot be moved
                continue
            key = "ArrowLeft" if now - low > high - now else "ArrowRight"  # towards the farther end

            def press(handle=handle, key=key):
                handle.focus()
                self.page.keyboard.press(key)

            name = (slider.locator(".widget-label").first.text_content() or "").strip()
            found.append((f"slider {name!r} ({key})", lambda readout=readout: readout.text_content().strip(), press))
        number = box.locator(".widget-inline-hbox input[type=number]")
        if number.count():
            field = number.first
            step = field.get_attribute("step") or "any"
            step = 1.0 if step == "any" else float(step)
            high = field.get_attribute("max")

            def bump():
                value = float(field.input_value())
                new = value - step if high is not None and value + step > float(high) else value + step
                field.fill(str(int(new)) if new == int(new) else str(new))
                field.press("Enter")

            found.append(("number field", field.input_value, bump))
        checkbox = box.locator(".widget-checkbox input[type=checkbox]")
        if checkbox.count():
            found.append(("checkbox", lambda: str(checkbox.first.is_checked()), checkbox.first.click))
        dropdown = box.locator(".widget-dropdown select")
        if dropdown.count():
            select = dropdown.first

            def next_option():
                count = select.locator("option").count()
                select.select_option(index=(select.evaluate("s => s.selectedIndex") + 1) % count)

            found.append(("dropdown", select.input_value, next_option))
        text = box.locator(".widget-text input[type=text], .widget-textarea textarea")
        if text.count():
            field = text.first

            def append():
                field.fill(field.input_value() + " and why?")
                field.press("Enter")

            found.append(("text field", field.input_value, append))
        return found

    def change_control(
        self, box, *, max_steps: int = 25, timeout: float = 30.0, measure: bool = False, control: int = 0
    ) -> ControlChange:
        """Operate one control of ``box`` (``controls(box)[control]``) until its output has changed.

        A slider gets one arrow-key press at a time (noUiSlider: focus + ArrowRight/ArrowLeft); after
        each, wait for the value to move and the kernel to go idle, then look at the output (a step
        may round to the same view, e.g. a side rounded to 28); it stops when text and image have
        both changed, after 5 steps if only one of them has, or after ``max_steps``. A checkbox is clicked, a dropdown moves to its next
        option, a number or text field is edited, once.
        With ``measure``, the first step is timed in the page: key/click → changed output decoded.
        """
        box.scroll_into_view_if_needed()
        controls = self.controls(box)
        if not controls:
            raise AssertionError(f"{self.relpath}: a widget with no control the suite knows how to operate")
        kind, value, step = controls[control]
        output = box.locator("> .widget-output").first
        value_before = value()
        before = self.output_state(output)
        after, latency = before, None
        steps_allowed = max_steps if kind.startswith("slider") else 1
        for steps in range(1, steps_allowed + 1):
            previous = value()
            watcher = output.evaluate_handle(_WATCH_JS, [before, timeout * 1000]) if measure and steps == 1 else None
            step()
            if watcher is not None:
                latency = self.page.evaluate("(w) => w.done", watcher)
            deadline = time.monotonic() + timeout
            while value() == previous:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.relpath}: the {kind} stayed at {previous!r}")
                self.page.wait_for_timeout(50)
            self.wait_idle(timeout, interval_ms=150)
            self.page.wait_for_function(
                "(out) => Array.from(out.querySelectorAll('img')).every(i => i.complete)",
                arg=output.element_handle(),
                timeout=timeout * 1000,
            )
            after = self.output_state(output)
            text_done = not before["text"] or after["text"] != before["text"]
            image_done = not before["images"] or after["images"] != before["images"]
            if text_done and image_done:
                break
            if steps >= 5 and (after["text"] != before["text"] or after["images"] != before["images"]):
                break  # one part moves and the other has not in 5 steps: it depends on another control
        return ControlChange(kind, value_before, value(), before, after, steps, latency)

    def operate_widget(self, box, **kwargs) -> list[ControlChange]:
        """Operate the controls of ``box`` in turn (sliders first) until one has changed both its
        text and its image; returns what each one did."""
        changes = []
        for index in range(len(self.controls(box))):
            change = self.change_control(box, control=index, **kwargs)
            changes.append(change)
            if change.text_changed and change.image_changed:
                break
        return changes
