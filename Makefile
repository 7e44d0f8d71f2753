# Two commands matter: `make run` (the main job) and `make test`. Both set up .venv themselves.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# Small CPU demo by default; override e.g. `make run STEPS=3000 IMAGE_SIZE=256`.
DATA       ?= data/synthetic
CATEGORY   ?= tray
IMAGE_SIZE ?= 128
STEPS      ?= 300
PRETRAIN   ?= 100
RUN_DIR    ?= runs/$(CATEGORY)

.PHONY: setup run test clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	# The CPU build of torch 2.13.0 (what pip finds on CPU machines); on a GPU host install a CUDA build instead.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,serve,triton,dev]'
	@rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP)

run: setup
	$(VENV)/bin/slsg synth $(DATA) --image-size 256
	$(VENV)/bin/slsg train --data $(DATA) --category $(CATEGORY) --out $(RUN_DIR) \
	    --image-size $(IMAGE_SIZE) --steps $(STEPS) --pretrain-steps $(PRETRAIN)
	$(VENV)/bin/slsg evaluate --checkpoint $(RUN_DIR)/checkpoint.pt --data $(DATA) --category $(CATEGORY) \
	    --out $(RUN_DIR)/eval

test: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/python -m pytest -q -rs --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
