# fmtrain developer entry points. Every target that runs Python first makes sure .venv exists
# and has fmtrain installed (editable, with the test extra), so `make test` works on a fresh clone.

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.fmtrain-installed

# OMP_NUM_THREADS stays unset: torch and torchrun pick their own thread counts.
unexport OMP_NUM_THREADS

.PHONY: venv demo test lint clean distclean

venv: $(STAMP)

# torch first and pinned: here `torch==2.13.0` resolves to the local CPU wheel; letting the
# dependency resolver choose torch could pull a multi-GB CUDA build. The stamp makes a second
# run instant, and re-installs when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install torch==2.13.0
	$(VENV)/bin/python -m pip install -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/fmtrain demo

test: venv
	$(VENV)/bin/python -m pytest -q --durations=15 tests

# ruff (lint + format check) and the import-linter layers contract, as CI runs them.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Build and test leftovers; run directories (runs/) and .venv are kept.
clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

# clean, and the virtual environment too.
distclean: clean
	rm -rf $(VENV)
