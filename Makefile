# Two commands matter: `make run` (the main job) and `make test`. Both set up .venv themselves.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# `make run`: a small CPU demo by default; override e.g. `make run STEPS=1000 IMAGE_SIZE=256`.
SLSG       := $(VENV)/bin/slsg
DATA       ?= data/synthetic
CATEGORY   ?= tray
IMAGE_SIZE ?= 128
STEPS      ?= 300
PRETRAIN   ?= 100
COMPOSITION_STEPS ?= 2000
RUN_DIR    ?= runs/$(CATEGORY)
REPOSITORY ?= model_repository
HOST       ?= 127.0.0.1
PORT       ?= 8080

.PHONY: setup run test clean prometheus postgresql chromium

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
	@test -d $(DATA)/$(CATEGORY) || $(SLSG) synth $(DATA) --image-size 256
	@if ls $(REPOSITORY)/$(CATEGORY)/*/model.onnx >/dev/null 2>&1; then \
	    echo "model $(CATEGORY) already in $(REPOSITORY); skipping training (delete it to retrain)"; \
	else \
	    $(SLSG) train --data $(DATA) --category $(CATEGORY) --out $(RUN_DIR) --image-size $(IMAGE_SIZE) \
	        --steps $(STEPS) --pretrain-steps $(PRETRAIN) --composition-steps $(COMPOSITION_STEPS) && \
	    $(SLSG) evaluate --checkpoint $(RUN_DIR)/checkpoint.pt --data $(DATA) --out $(RUN_DIR)/eval && \
	    $(SLSG) export --checkpoint $(RUN_DIR)/checkpoint.pt --repository $(REPOSITORY) --name $(CATEGORY) \
	        --cpu-config || exit 1; \
	fi
	@echo
	@echo "Gateway starting on http://$(HOST):$(PORT) (docs at /docs). Once it is up, try:"
	@echo
	@echo "  curl -s -X POST -H 'Content-Type: image/png' -H 'X-Line-Id: line-1' \\"
	@echo "       --data-binary @$$(ls $(DATA)/$(CATEGORY)/test/logical_anomalies/*.png | head -1) \\"
	@echo "       http://$(HOST):$(PORT)/v1/models/$(CATEGORY)/inspect"
	@echo
	$(SLSG) serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT)

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

test: setup prometheus postgresql chromium
	OMP_NUM_THREADS=2 $(VENV)/bin/python -m pytest -q -rs --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
