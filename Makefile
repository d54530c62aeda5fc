# Set-up and the main jobs. torch==2.13.0 goes in first: it is the CPU wheel on this machine's disk,
# and every other requirement is chosen so that it is satisfied by it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install dev run test lint bench clean chromium

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

dev: $(VENV)/.dev-installed

run: install
	$(VENV)/bin/lmforge speedrun

lint: dev
	$(VENV)/bin/ruff check lmforge tests benchmarks
	$(VENV)/bin/ruff format --check lmforge tests benchmarks

# the chat-page test drives Debian's chromium through Playwright (`playwright install` downloads nothing here);
# installing it needs root, or run the apt-get line with sudo once
chromium:
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)

# two workers, each test file in one of them (module fixtures such as the torchrun layouts run once): 5.5 min on
# 2 cores against 10.5 min in one process
test: lint chromium
	$(VENV)/bin/pytest -n 2 --dist loadfile

bench: dev
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_time_to_quality.py
	$(PY) benchmarks/bench_dedup.py
	$(PY) benchmarks/bench_prepare.py
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/parallel.py
	$(PIP) install -q 'llama-cpp-python>=0.3.36'  # compiles llama.cpp: ~15 min on 2 cores the first time
	$(PY) benchmarks/bench_llamacpp.py

clean:
	rm -rf $(VENV) runs
