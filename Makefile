# The course's two commands (see README.md):
#   make lab    set everything up into .venv/ (if needed) and open the course in JupyterLab
#   make test   set everything up (if needed) and run every test: unit tests + all notebooks (nbval)
# Set-up is redone only when requirements.txt or pyproject.toml change.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL := qwenvl-course
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
PYTEST_ARGS ?=

.PHONY: setup lab test unit notebooks execute

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or: make PYTHON=/path/to/python3.11 ..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python 3 (Qwen2.5-VL course)"
	touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) notebooks/

# The browser suite (tests/browser/: every notebook in JupyterLab in Debian's chromium) runs in the
# same pytest session, after the unit tests and nbval; chromium comes from apt, never `playwright install`.
test: setup
	@test -x /usr/bin/chromium || { apt-get update && apt-get install -y chromium; }
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env --durations=15 $(PYTEST_ARGS)

# Re-execute notebooks in place (top to bottom, one kernel), as they are committed: make execute NB=notebooks/00_quickstart.ipynb
execute: setup
	$(PY) scripts/execute_notebooks.py $(or $(NB),notebooks/*.ipynb)
