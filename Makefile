# Set-up and the main jobs. torch==2.13.0 goes in first: it is the CPU wheel on this machine's disk,
# and every other requirement is chosen so that it is satisfied by it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install dev run test lint bench clean

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

test: lint
	$(VENV)/bin/pytest

bench: dev
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_time_to_quality.py
	$(PY) benchmarks/bench_dedup.py

clean:
	rm -rf $(VENV) runs
