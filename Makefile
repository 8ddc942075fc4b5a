# `make demo` and `make test` each set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench proto clean edge-env

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints pin torch==2.13.0 (CPU build); an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgesplit demo

lint: $(STAMP)
	$(BIN)/ruff check edgesplit tests bench
	$(BIN)/lint-imports

# mypy settings: [tool.mypy] in pyproject.toml (checks the Python 3.10 branch of the code)
typecheck: $(STAMP)
	$(BIN)/mypy edgesplit

# coverage settings: [tool.coverage.*] in pyproject.toml (subprocesses measured too)
test: lint
	$(BIN)/pytest -q --cov=edgesplit --cov-report=term:skip-covered

bench: $(STAMP)
	$(BIN)/python bench/codecs.py
	$(BIN)/python bench/split_overhead.py
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/edge_runtime.py

proto: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/gen_proto.sh

clean:
	rm -rf $(VENV) .venv-edge .pytest_cache .ruff_cache .mypy_cache .coverage .coverage.* export/out
