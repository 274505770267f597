# `make demo`: set everything up and run the shipped seed experiment.
# `make test`: set everything up and pass the tests (`make test-fast`: all but the slow ones).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fitcli-installed

.PHONY: setup demo test test-fast lint format bench clean screenshot

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fitcli train configs/seed.yaml

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest

# The unit and CLI tests only (under a minute): everything but the tests marked slow.
test-fast: setup
	$(VENV)/bin/pytest -m "not slow"

# ruff, the type check of src/ (mypy, configured in pyproject.toml) and the import rules
# (rich only in console, plotly only in plots, no torch in the CLI or the sweep's plan).
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q tests/test_import_rules.py

format: setup
	$(VENV)/bin/ruff format src tests benchmarks

bench: setup
	$(PY) benchmarks/train_speed.py

# docs/report.png for the README: the seed report in headless Chromium (needs chromium, chromium-driver).
screenshot: setup
	$(PY) tools/screenshot.py docs/report.png

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
