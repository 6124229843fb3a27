# One-command entry points. `make setup` builds .venv once; it is redone only when requirements.txt changes.
PYTHON_SYS ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: setup demo test lint bench

include docs/make_data_targets.mk

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	cp requirements.txt $(STAMP)

demo: setup
	$(PY) -m launch.demo --out runs/demo

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m bench --quick
