# slimllm: `make demo` installs everything and runs the main job; `make test` installs everything and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch install-gpu`.
TORCH ?= torch==2.13.0
LLAMA_CPP := llama-cpp-python==0.3.36
# llama-cpp-python compiles from source (~4 min on 2 cores); the built wheel is kept here and reused.
WHEELHOUSE ?= $(HOME)/.cache/slimllm/wheels
STAMP := $(VENV)/.slimllm-installed
DATA_DIR ?= ../shared/data/wikitext2
EVAL_DATA := $(if $(wildcard $(DATA_DIR)/wiki.test.raw),$(DATA_DIR)/wiki.test.raw,wikitext2)
DEMO_OUT ?= runs/demo

.PHONY: install install-gpu test demo lint bench-quality clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	@mkdir -p $(WHEELHOUSE)
	@ls $(WHEELHOUSE)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		$(BIN)/python -m pip wheel --no-deps --wheel-dir $(WHEELHOUSE) "$(LLAMA_CPP)"
	$(BIN)/python -m pip install --quiet --find-links $(WHEELHOUSE) -e ".[llama,dev]"
	@touch $@

install: $(STAMP)

# onnxruntime-gpu and onnxruntime ship the same module; swap the CPU wheel out.
install-gpu: $(STAMP)
	$(BIN)/python -m pip uninstall --yes onnxruntime
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps "onnxruntime-gpu>=1.20"

test: install
	$(BIN)/ruff check slimllm exporters tests bench examples
	$(BIN)/python -m pytest

demo: install
	$(BIN)/slimllm prune smollm2-135m --method shortgpt --remove 8 --calib self --out $(DEMO_OUT)/pruned --force
	$(BIN)/slimllm eval smollm2-135m --data $(EVAL_DATA) --seq-len 1024 --max-windows 8 --out $(DEMO_OUT)/dense-eval.json
	$(BIN)/slimllm eval $(DEMO_OUT)/pruned --data $(EVAL_DATA) --seq-len 1024 --max-windows 8 --out $(DEMO_OUT)/pruned-eval.json
	@echo "demo finished: pruned checkpoint in $(DEMO_OUT)/pruned, perplexities in $(DEMO_OUT)/*-eval.json"

lint: install
	$(BIN)/ruff check slimllm exporters tests bench examples

bench-quality: install
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) runs .pytest_cache
