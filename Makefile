# `make demo` and `make test` work from a fresh clone with only Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A plain `torch` requirement pulls a multi-GB CUDA build; without a GPU take the CPU wheel first.
TORCH := torch==2.13.0

.PHONY: demo test browser lint install clean

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

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The explorer's browser tests (tests/test_explore_browser.py) drive a real headless Chromium through
# Selenium. Debian/Ubuntu's packages supply the browser and its driver; where they cannot be installed
# (no apt-get, not root, no passwordless sudo) those tests skip themselves and the rest still run.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "browser: no /usr/bin/chromium and no apt-get; install Chromium and ChromeDriver to run the browser tests (skipped without them)"; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else echo "browser: Chromium is missing and installing it needs root: run 'sudo apt-get install chromium chromium-driver' for the browser tests (skipped without it)"; exit 0; fi; \
		echo "browser: installing chromium and chromium-driver with apt-get (once)"; \
		if $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/tmp/binarylm-apt.log 2>&1 && \
		   $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >>/tmp/binarylm-apt.log 2>&1; \
		then echo "browser: $$(/usr/bin/chromium --version 2>/dev/null)"; \
		else tail -n 5 /tmp/binarylm-apt.log; echo "browser: apt-get could not install chromium chromium-driver (log: /tmp/binarylm-apt.log); the browser tests will be skipped"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check binarylm tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
