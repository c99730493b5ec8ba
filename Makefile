# slimllm: `make demo` installs everything and runs the main job; `make test` installs everything and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch install-gpu`.
TORCH ?= torch==2.13.0
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP := llama-cpp-python==$(LLAMA_CPP_VERSION)
# llama-cpp-python compiles llama.cpp for this CPU (~4 min on 2 cores). The wheel is kept and reused, keyed by the
# CPU's feature flags so that a cache shared between different machines never hands out a wheel built for another CPU.
SLIMLLM_CACHE ?= $(HOME)/.cache/slimllm
WHEELHOUSE ?= $(SLIMLLM_CACHE)/wheels
CPU_KEY := $(shell (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | cksum | cut -d' ' -f1)
# On x86, llama.cpp is built without AMX: on the virtualized Xeons we test on, AMX tile instructions crash llama.cpp's
# quantized matmuls (Q8_0, Q4_*), while the AVX-512 kernels run fine. Override LLAMA_CMAKE_ARGS to build with AMX.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
else
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON
endif
# The cache key covers the build flags too, so a CUDA build (LLAMA_CMAKE_ARGS=-DGGML_CUDA=on) is kept apart.
BUILD_KEY := $(shell echo '$(LLAMA_CMAKE_ARGS)' | cksum | cut -d' ' -f1)
LLAMA_WHEELS := $(WHEELHOUSE)/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(CPU_KEY)-$(BUILD_KEY)
# llama.cpp's own tools (llama-perplexity, llama-bench, llama-quantize), built from the llama.cpp tree vendored in the
# same llama-cpp-python sdist with the same flags, and cached like the wheel (~8 min on 2 cores, once).
LLAMA_TOOLS ?= $(SLIMLLM_CACHE)/llama-tools-$(LLAMA_CPP_VERSION)-$(CPU_KEY)-$(BUILD_KEY)
LLAMA_TOOL_TARGETS := llama-perplexity llama-bench llama-quantize
STAMP := $(VENV)/.slimllm-installed
DATA_DIR ?= ../shared/data/wikitext2
EVAL_DATA := $(if $(wildcard $(DATA_DIR)/wiki.test.raw),$(DATA_DIR)/wiki.test.raw,wikitext2)
DEMO_OUT ?= runs/demo

.PHONY: install install-gpu gpu-check gpu-heal gpu-bundle bench-healing test test-fast demo docs lint bench-quality bench-speed bench-eval-reference bench-export-parity bench-hellaswag bench-heal-memory bench-scale bench-scale-3b bench-gemma3 llama-tools clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel "setuptools>=77"
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	@mkdir -p $(LLAMA_WHEELS)
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --no-deps --no-cache-dir \
			--wheel-dir $(LLAMA_WHEELS) "$(LLAMA_CPP)"
	$(BIN)/python -m pip install --quiet --find-links $(LLAMA_WHEELS) -e ".[llama,genai,gemma3,dev]"
	@touch $@

install: $(STAMP)

# onnxruntime-gpu and onnxruntime ship the same module; swap the CPU wheel out.
install-gpu: $(STAMP)
	$(BIN)/python -m pip uninstall --yes onnxruntime
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps "onnxruntime-gpu>=1.20"

# On a machine with one NVIDIA GPU: the GPU build, the GPU-marked tests, bf16 TRSP, CUDA-EP parity and the cuda
# profile, in about 8 minutes, ending with one summary table.
gpu-check: install-gpu
	$(BIN)/python bench/gpu_check.py

# The CUDA healing rows (4 M and 16 M tokens, bf16 autocast over fp32 master weights) of bench/healing.py.
gpu-heal: install-gpu
	$(BIN)/python bench/healing.py --device cuda --tokens 4194304 16777216 --batch-size 32 --generate-batch 256 \
		--hellaswag-tasks 1000 --rows wikitext "half teacher text" --tag gpu

# For a GPU machine without network: wheels, the embedded model and the data in parts of at most 55 MiB under
# .gpu/, one part per call of `bash bench/gpu_machine.sh` there (docs/guide.md, GPU).
gpu-bundle: install
	$(BIN)/python bench/gpu_bundle.py

test: install
	$(BIN)/ruff check slimllm exporters tests bench examples
	$(BIN)/python -m pytest

# The tier to run while working: everything but the integration tests (real SmolLM2-135M and Gemma 3) and the
# slow end-to-end ones. `make test` (CI) runs the whole suite.
test-fast: install
	$(BIN)/ruff check slimllm exporters tests bench examples
	$(BIN)/python -m pytest -m "not integration and not slow"

demo: install
	$(BIN)/slimllm compile smollm2-135m --recipe examples/recipes/smollm2-135m-demo.toml \
		--eval-data $(EVAL_DATA) --out $(DEMO_OUT)

# docs/cli.md is generated from the commands and their settings classes; tests/test_docs.py keeps it current.
docs: install
	$(BIN)/python -m slimllm.cli.reference > docs/cli.md

lint: install
	$(BIN)/ruff check slimllm exporters tests bench examples

bench-quality: install
	$(BIN)/python bench/quality.py

bench-healing: install
	$(BIN)/python bench/healing.py

bench-speed: install
	$(BIN)/python bench/onnx_speed.py
	$(BIN)/python bench/gguf_speed.py

$(LLAMA_TOOLS)/bin/llama-perplexity:
	@rm -rf $(LLAMA_TOOLS).partial && mkdir -p $(LLAMA_TOOLS).partial/src
	$(PYTHON) -m pip download --quiet --no-binary :all: --no-deps --dest $(LLAMA_TOOLS).partial "$(LLAMA_CPP)"
	tar -xzf $(LLAMA_TOOLS).partial/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_TOOLS).partial/src \
		--strip-components=1
	cmake -S $(LLAMA_TOOLS).partial/src/vendor/llama.cpp -B $(LLAMA_TOOLS).partial/build -DCMAKE_BUILD_TYPE=Release \
		-DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF $(LLAMA_CMAKE_ARGS)
	cmake --build $(LLAMA_TOOLS).partial/build --config Release -j $$(nproc) --target $(LLAMA_TOOL_TARGETS)
	mkdir -p $(LLAMA_TOOLS).partial/bin
	cp $(addprefix $(LLAMA_TOOLS).partial/build/bin/,$(LLAMA_TOOL_TARGETS)) $(LLAMA_TOOLS).partial/bin/
	rm -rf $(LLAMA_TOOLS).partial/src $(LLAMA_TOOLS).partial/build $(LLAMA_TOOLS).partial/*.tar.gz
	mv $(LLAMA_TOOLS).partial $(LLAMA_TOOLS)

# HellaSwag on the whole validation split: dense SmolLM2 in PyTorch and its F16 GGUF in llama.cpp (over 40 min per
# model on 2 cores; the later tasks are longer than the first 1,000). LIMIT=1000 for the first 1,000 tasks.
LIMIT ?=
bench-hellaswag: install
	$(BIN)/python bench/hellaswag.py $(if $(LIMIT),--limit $(LIMIT) --name hellaswag-smollm2-135m-$(LIMIT))

llama-tools: $(LLAMA_TOOLS)/bin/llama-perplexity
	@echo "llama.cpp tools: $(LLAMA_TOOLS)/bin"

# slimllm's HellaSwag and KL-divergence figures against llama-perplexity's on the same GGUF files.
bench-eval-reference: install llama-tools
	$(BIN)/python bench/eval_reference.py --llama-tools $(LLAMA_TOOLS)/bin

# Every ONNX variant and GGUF type of SmolLM2-135M, dense and pruned, against PyTorch (about 15 min).
bench-export-parity: install
	$(BIN)/python bench/export_parity.py

bench-heal-memory: install
	$(BIN)/python bench/heal_memory.py

# About 30 minutes on 2 cores; needs 16 GB of RAM and 25 GB of disk (a random-weight 1B model and its exports).
bench-scale: install
	$(BIN)/python bench/scale.py --models smollm2-135m,llama-3.2-1b --plan-models qwen2.5-3b,llama-3.1-8b,llama-3.1-70b --tag smollm2-llama1b

# The 3B (Qwen2.5-3B-shaped) prune (whole, then offloaded to disk past 2 GiB) and fp32 ONNX export with external
# data (about 40 min; 23 GB of RAM, 35 GB of disk).
bench-scale-3b: install
	$(BIN)/python bench/scale.py --models qwen2.5-3b --steps prune,prune-offload,onnx-fp32 --tag qwen2.5-3b

# Gemma 3 270M end to end with examples/recipes/gemma3-270m.toml, then HellaSwag of dense and pruned (about 25 min).
bench-gemma3: install
	$(BIN)/python bench/gemma3.py

clean:
	rm -rf $(VENV) runs .pytest_cache
