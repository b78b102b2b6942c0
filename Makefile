# diffusion_lab: `make setup` installs (CPU torch first), `make test` runs the suite, `make demo` the quickstart.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: setup test test-fast lint format demo bench

setup:
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'

test: setup
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .

demo: setup
	$(PY) -m diffusion_lab.train

bench:
	$(PY) -m diffusion_lab.bench
