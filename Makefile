# Fresh machine: `make example` (install, then run the whole example) or `make test`.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
export KEDRO_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 2

# pip installs into $(PYTHON) (a virtual environment, conda, pyenv...) unless that Python is
# externally managed (PEP 668, e.g. Debian's own python3): then into a project .venv.
MANAGED := $(shell $(PYTHON) -c "import sys, sysconfig, pathlib; print(int(sys.prefix == sys.base_prefix and pathlib.Path(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED').exists()))")
ifeq ($(MANAGED),1)
PY := .venv/bin/python
ENVIRONMENT := $(PY)
else
PY := $(PYTHON)
ENVIRONMENT :=
endif

.PHONY: install install-test data example lint test test-fast postgresql docs

# The example's Fashion-MNIST (conf/base/parameters_data.yml searches these in order): the four
# IDX files copied into data/01_raw/fashion-mnist/ (then no apt at all), Debian's
# dataset-fashion-mnist package, or, with neither and no apt-get, Keras fetches them at the
# first run (network needed).
LOCAL_FASHION_MNIST := $(wildcard data/01_raw/fashion-mnist/train-images-idx3-ubyte*)
APT_GET := $(shell command -v apt-get)

$(FASHION_MNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

ifneq ($(LOCAL_FASHION_MNIST)$(wildcard $(FASHION_MNIST)),)
data:
else ifeq ($(APT_GET),)
data:
	@echo "No apt-get here: copy the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz," \
	  "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into" \
	  "data/01_raw/fashion-mnist/, or let Keras fetch them at the first run (network needed)."
else
data: $(FASHION_MNIST)
endif

# The tests open kedro-viz and the MLflow UI in a real (headless) browser.
$(CHROMIUM):
	$(SUDO) apt-get install -y chromium \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

# The team tracking test starts a throwaway PostgreSQL cluster (initdb, pg_ctl; Debian puts them
# in /usr/lib/postgresql/<version>/bin).
POSTGRES := $(firstword $(shell command -v initdb) $(wildcard /usr/lib/postgresql/*/bin/initdb))
postgresql:
ifeq ($(POSTGRES),)
	$(SUDO) apt-get install -y postgresql \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y postgresql)
endif

.venv/bin/python:
	$(PYTHON) -m venv .venv \
	  || ($(SUDO) apt-get install -y python3-venv && $(PYTHON) -m venv .venv)

install: data $(ENVIRONMENT)
	$(PY) -m pip install -e .

install-test: data $(CHROMIUM) postgresql $(ENVIRONMENT)
	$(PY) -m pip install -e ".[test,docs]"

example: install
	$(PY) -m kedro run --env example --pipeline example

lint: install-test
	$(PY) -m ruff check src tests benchmarks

test: install-test lint
	$(PY) -m pytest

# The documentation site (mkdocs.yml, docs/), served at http://127.0.0.1:8000 and rebuilt on
# every change; `make test` builds it with `mkdocs build --strict` (tests/test_docs.py).
docs: $(ENVIRONMENT)
	$(PY) -m pip install -e ".[docs]"
	$(PY) -m mkdocs serve

# Everything but the tests marked slow (Kedro sessions, CLIs, subprocesses, servers).
test-fast: install-test
	$(PY) -m pytest -m "not slow"
