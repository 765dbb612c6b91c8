"""Execute notebooks in place, top to bottom in one fresh kernel, as the course commits them.

    .venv/bin/python scripts/execute_notebooks.py notebooks/03_video_frames.ipynb [...]

Runs in the cpu profile unless QWENVL_PROFILE says otherwise, with the network blocked, prints each
notebook's wall time, and stamps the course kernelspec into its metadata.
"""

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KERNELSPEC = {"name": "qwenvl-course", "display_name": "Python 3 (Qwen2.5-VL course)", "language": "python"}


def execute(path: Path) -> float:
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata["kernelspec"] = KERNELSPEC
    notebook.metadata.setdefault("language_info", {"name": "python"})
    client = NotebookClient(
        notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    notebook.metadata["kernelspec"] = KERNELSPEC
    nbformat.write(notebook, path)
    return elapsed


def main(paths: list[str]) -> None:
    os.environ.setdefault("QWENVL_BLOCK_NETWORK", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for name in paths:
        elapsed = execute(Path(name))
        print(f"{name}: executed in {elapsed:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
