# Fresh machine: `make example` (install, then run the whole example) or `make test`.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
export KEDRO_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install install-test data example lint test test-fast

$(FASHION_MNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

data: $(FASHION_MNIST)

# The tests open kedro-viz in a real (headless) browser.
$(CHROMIUM):
	$(SUDO) apt-get install -y chromium \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

install: data
	$(PYTHON) -m pip install -e .

install-test: data $(CHROMIUM)
	$(PYTHON) -m pip install -e ".[test]"

example: install
	kedro run

lint: install-test
	$(PYTHON) -m ruff check src tests benchmarks

test: install-test lint
	$(PYTHON) -m pytest

# Everything but the tests marked slow (Kedro sessions, CLIs, subprocesses, servers).
test-fast: install-test
	$(PYTHON) -m pytest -m "not slow"
