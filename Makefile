# Two commands matter: `make run` (the main job) and `make test`. Both set up .venv themselves.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# `make run`: the demo recipe (configs/demo.yaml: a few minutes on 2 cores); `make run RECIPE=default`
# trains the recipe behind the published numbers on the full-size synthetic data set.
SLSG       := $(VENV)/bin/slsg
RECIPE     ?= demo
CONFIG     ?= configs/$(RECIPE).yaml
CATEGORY   ?= tray
ifeq ($(RECIPE),demo)
DATA       ?= data/demo
SYNTH_ARGS ?= --image-size 128 --train 60 --validation 20 --test-good 10 --test-logical 10 --test-structural 10
else
DATA       ?= data/synthetic
SYNTH_ARGS ?= --image-size 256
endif
RUN_DIR    ?= runs/$(CATEGORY)-$(RECIPE)
REPOSITORY ?= model_repository
HOST       ?= 127.0.0.1
PORT       ?= 8080

.PHONY: setup run test test-fast lint clean prometheus postgresql chromium checkov

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	# The CPU build of torch 2.13.0 (what pip finds on CPU machines); on a GPU host install a CUDA build instead.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,serve,triton,bench,dev]'
	@rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP)

# The main job: data -> model (only if the repository has none) -> gateway on the embedded backend.
run: setup
	@bash scripts/run.sh "$(SLSG)" "$(DATA)" "$(CATEGORY)" "$(CONFIG)" "$(RUN_DIR)" "$(REPOSITORY)" \
	    "$(HOST)" "$(PORT)" $(SYNTH_ARGS)

# promtool/prometheus for the ops tests: Debian's package (CI runs as root).
PROMETHEUS_PKG := $(shell command -v promtool >/dev/null 2>&1 || echo missing)

prometheus:
ifeq ($(PROMETHEUS_PKG),missing)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else echo "promtool not found and cannot apt-get install prometheus: the ops tests will be skipped"; fi
endif

# PostgreSQL server (record-store tests start their own cluster) and chromium (the review page's browser
# test): Debian's packages, installed the same way.
POSTGRES_PKG := $(shell ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || echo missing)
CHROMIUM_PKG := $(shell test -x /usr/bin/chromium || echo missing)

postgresql:
ifeq ($(POSTGRES_PKG),missing)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	else echo "PostgreSQL not found and cannot apt-get install postgresql: the PostgreSQL record tests will be skipped"; fi
endif

chromium:
ifeq ($(CHROMIUM_PKG),missing)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else echo "chromium not found and cannot apt-get install chromium: the review page's browser test will be skipped"; fi
endif


# checkov (security scan of deploy/k8s) in a venv of its own: its pinned dependencies clash with ours
CHECKOV_VERSION := 3.3.30
CHECKOV := $(VENV)/checkov/bin/checkov

$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q checkov==$(CHECKOV_VERSION)

checkov: $(CHECKOV)

test: setup prometheus postgresql chromium checkov
	OMP_NUM_THREADS=2 $(VENV)/bin/python -m pytest -q -rs --durations=15

lint: setup
	$(VENV)/bin/ruff check .

# the quick loop: everything but the tests marked slow (real servers, training runs)
test-fast: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/python -m pytest -q -m "not slow" -x

clean:
	rm -rf $(VENV) .pytest_cache
