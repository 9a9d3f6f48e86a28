# Two commands matter: `make demo` and `make test`. Both create or reuse .venv;
# `make install` sets up .venv and .tools/ (anvil) without running anything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepstream-installed
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint bench tiny-shapes clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, from the CPU build where none is installed: otherwise pip would
# resolve the dependency to the newest CUDA build (several GB).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The browser test drives Debian's chromium; install it once (root, or sudo).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null

# The environment alone: .venv with the package, and anvil (from npm) in .tools/.
install: $(STAMP)
	$(PY) -c "from stepstream.anvil import find_or_install_anvil; print('anvil:', find_or_install_anvil())"

demo: $(STAMP)
	$(PY) -m stepstream.demo --out out

test: $(STAMP) $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/stepstream bench

# Retrain stepstream/tiny-shapes' committed weights (deterministic; ~15-30 min on 2 cores).
tiny-shapes: $(STAMP)
	nice -n 10 $(PY) -m pipelines.train_tiny

clean:
	rm -rf $(VENV) out build *.egg-info
