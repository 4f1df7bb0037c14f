# The README's commands. Everything a fresh machine needs is installed here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch comes in pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned
# `torch` could pull a several-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
JOBS   ?= 2

.PHONY: setup setup-bench test demo bench lint format clean browser gpu-check gpu-check-prep

setup: $(STAMP) browser

# The chat page is tested in a real headless browser: Debian's chromium (needs root or sudo).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

$(VENV)/.bench: $(STAMP)
	$(PIP) install -q -e '.[dev,bench]'
	touch $(VENV)/.bench

setup-bench: $(VENV)/.bench

# TRITON_INTERPRET=1 runs the Triton kernels on the CPU (set before triton is imported).
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(JOBS) --durations=15

# The demo needs no browser (only the page test does), so neither root nor apt: $(STAMP).
# --seq-len 256 (the seed preset's 80 cannot hold a two-turn chat), --batch-size 5: as many
# tokens per step as the preset's 16 x 80, so it trains in about the same time.
demo: $(STAMP)
	$(VENV)/bin/llm-train --data data/pretrain.json --chat-data data/chat.json \
		--preset seed --seq-len 256 --batch-size 5 --out runs/demo \
		--pretrain-steps 600 --sft-steps 300
	$(VENV)/bin/llm-chat runs/demo --prompt "What is a tokenizer?" --temperature 0

bench: setup-bench
	$(PY) benchmarks/bench_tokenizer.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/kernel_report.py

# The one prepared device check (issue #10). Depends on no setup: the device machine has
# torch/triton/transformers but no package index; the script installs nothing.
GPU_PY ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# Run where a package index is reachable, before carrying the checkout to the GPU machine:
# the Liger-Kernel wheel (a same-run peer) into benchmarks/peer_wheels/ (gitignored).
PEER_WHEELS := benchmarks/peer_wheels
gpu-check-prep:
	mkdir -p $(PEER_WHEELS)
	$(GPU_PY) -m pip download -q --no-deps --dest $(PEER_WHEELS) liger-kernel

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
