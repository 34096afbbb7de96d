# `make demo` and `make test` work from a fresh clone with only Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A plain `torch` requirement pulls a multi-GB CUDA build; without a GPU take the CPU wheel first.
TORCH := torch==2.13.0

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: torch from the index"; \
	else $(BIN)/pip install --quiet $(TORCH); fi
	$(BIN)/pip install --quiet -e ".[dev,interop,eval,serve]"
	touch $(STAMP)

install: $(STAMP)

# Tokenizer, shards, pretraining, evaluation against xz, samples and runs/demo/report.md.
# The budget is wall-clock minutes for the whole job: `make demo MINUTES=3` for a quick look.
MINUTES ?= 10
demo: $(STAMP)
	$(BIN)/binarylm demo --minutes $(MINUTES)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check binarylm tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
