# The course's two commands (see README.md):
#   make lab    set everything up into .venv/ (if needed) and open the course in JupyterLab
#   make test   set everything up (if needed), lint, and run every test: unit tests, every notebook once
#               (nbval), every widget in JupyterLab in Chromium (the browser suite); see the target below
# Set-up is redone only when requirements.txt, requirements-dev.txt or pyproject.toml change.
# pip byte-compiles what it installs on one core; compileall does it on all of them, which makes the
# set-up about 10 % faster (farm-bench, 3 pairs). Like pip, it skips files it cannot compile (torch ships
# a few for newer Pythons), hence `|| true`: the .pyc files are only a cache.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
KERNEL := qwenvl-course
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
PYTEST_ARGS ?=

.PHONY: setup lab test lint format execute

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or: make PYTHON=/path/to/python3.11 ..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -r requirements.txt
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python 3 (Qwen2.5-VL course)"
	touch $(STAMP)

# The test tools (pytest, nbval, playwright, ruff): only what `make test` needs, not the course.
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(DEV_STAMP)

lab: setup
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) notebooks/

# Lint (ruff: the rules and why are in pyproject.toml) and the format check, then two pytest sessions:
# 1. the unit tests, the light notebooks 00-09 (nbval) and their widgets in the browser suite, two at a
#    time (pytest-xdist; one torch thread each, so the two never wait on each other's threads). The
#    browser suite (tests/browser/: each notebook's widget cells in JupyterLab in Debian's chromium;
#    chromium comes from apt, never `playwright install`) goes first, on one worker: it mostly waits on
#    the page and the kernel, so the other worker's tests fill the time;
# 2. one at a time, with every core: the training notebooks 10-13 (11 starts from the checkpoint 10
#    saved in the session's cache), then their widgets in the browser suite. OMP_WAIT_POLICY=PASSIVE:
#    torch's OpenMP threads sleep at a barrier instead of spinning. On a machine shared with other
#    CPU-bound work, a spinning thread can hold the core its peer needs, and every parallel region then
#    waits a scheduler slice: notebook 10's training cell took over 15 minutes (74 s alone) that way.
#    Passive waiting costs about 3 % when the machine is quiet.
# Every notebook is executed once, by nbval. The cell timeout is an hour, not nbval's 2,000 s: a busy
# machine may slow a training cell many times over (see 2.), and slow is not wrong.
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=3600
test: $(DEV_STAMP) lint
	@test -x /usr/bin/chromium || { apt-get update && apt-get install -y chromium; }
	COURSE_NOTEBOOKS='0[0-9]_*.ipynb' OMP_NUM_THREADS=1 $(PY) -m pytest tests notebooks/0[0-9]_*.ipynb \
		-n 2 --dist loadfile --no-loadscope-reorder $(NBVAL) --durations=10 $(PYTEST_ARGS)
	COURSE_NOTEBOOKS='1[0-9]_*.ipynb' OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest notebooks/1[0-9]_*.ipynb \
		tests/browser/test_notebooks_in_browser.py $(NBVAL) --durations=10 $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check helpers scripts tests conftest.py
	$(VENV)/bin/ruff format --check helpers scripts tests conftest.py

# Rewrite the code in the project's format (what `make lint` checks).
format: $(DEV_STAMP)
	$(VENV)/bin/ruff format helpers scripts tests conftest.py

# Re-execute notebooks in place (top to bottom, one kernel), as they are committed: make execute NB=notebooks/00_quickstart.ipynb
execute: setup
	$(PY) scripts/execute_notebooks.py $(or $(NB),notebooks/*.ipynb)
