"""Layering: the library's training entry points load no widget layer."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET_LAYER = ("matplotlib.pyplot", "ipywidgets", "IPython")

PROBE = """
import json, runpy, sys
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit:
    pass
print(json.dumps([m for m in {layer!r} if m in sys.modules]))
"""


def test_training_entry_points_load_no_widget_layer():
    """What each torchrun rank imports: ``python -m helpers.grpo`` / ``helpers.sft`` up to argument
    parsing (``--help``), then the modules it holds."""
    for module in ("helpers.grpo", "helpers.sft"):
        probe = PROBE.format(module=module, layer=WIDGET_LAYER)
        done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == [], module
