# One meaning per target. `make run` and `make test` work on a fresh machine (they set up first).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard protos/retinal/v1/*.proto)
GENERATED := $(PROTOS:.proto=_pb2.py)

.PHONY: setup protos run test lint format bench loadtest clean

setup: $(VENV)/.installed protos

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Python code generated from the gRPC contracts (never edited by hand, not committed).
protos: $(GENERATED)

$(GENERATED) &: $(PROTOS) $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# The embedded default: every service as a local process (CPU), an example analysed, API up.
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

# A local stack under locust for 45 s, failing on any error or on a p95 over its bound.
loadtest: setup
	$(BIN)/python -m bench.loadtest --short

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var build .pytest_cache .ruff_cache
	find protos -name '*_pb2*.py*' -delete
