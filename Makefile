# The whole set-up on a fresh machine (Python 3.11, pip, venv, gcc).
# Re-running a target is quick: installs are redone only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,plot,distributed,jwst]'
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(VENV)/bin/subpixal-jax demo

lint: $(VENV)/.installed-test
	$(PY) -m ruff check subpixal_jax tests benchmarks examples
	$(PY) -m ruff format --check subpixal_jax tests benchmarks examples

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
