# `make demo` and `make test` each set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck test-py310 bench proto clean edge-env

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints pin torch==2.13.0 (CPU build); an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgesplit demo

lint: $(STAMP)
	$(BIN)/ruff check edgesplit tests bench scripts
	$(BIN)/lint-imports

# mypy settings: [tool.mypy] in pyproject.toml (checks the Python 3.10 branch of the code)
typecheck: $(STAMP)
	$(BIN)/mypy edgesplit

# coverage settings: [tool.coverage.*] in pyproject.toml (subprocesses measured too)
test: lint typecheck
	$(BIN)/pytest -q --cov=edgesplit --cov-report=term:skip-covered

# Python 3.10, the oldest pyproject.toml claims: the base install (the torch-free edge runtime)
# plus the dev tools, pinned by the python_version < "3.11" lines of constraints.txt, running the
# tests that need no torch ([train]'s pins need 3.11). mypy checks the 3.10 branch of the code.
PYTHON310 ?= python3.10
VENV310   := .venv-py310
PY310_TESTS := tests/codecs tests/wire tests/transport tests/quality tests/cli/test_cli_help.py \
	tests/cli/test_cli_errors.py tests/cli/test_server_address.py tests/cli/test_status_times.py
$(VENV310)/.installed: pyproject.toml constraints.txt
	$(PYTHON310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install --quiet --upgrade pip
	$(VENV310)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

test-py310: $(VENV310)/.installed
	$(VENV310)/bin/python --version
	$(VENV310)/bin/pytest -q $(PY310_TESTS) --ignore=tests/codecs/test_codec_fixed.py

bench: $(STAMP)
	$(BIN)/python bench/codecs.py
	$(BIN)/python bench/split_overhead.py
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/edge_runtime.py
	$(BIN)/python bench/rate.py
	$(BIN)/python bench/ondevice_train.py
	$(BIN)/python bench/load.py

proto: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/gen_proto.sh

clean:
	rm -rf $(VENV) .venv-edge $(VENV310) .pytest_cache .ruff_cache .mypy_cache .coverage .coverage.* export/out
