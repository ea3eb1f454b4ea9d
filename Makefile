# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  ?= dev,triton,transformers

.PHONY: demo test bench lint format clean

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the local CPU build, so no other requirement pulls a CUDA build.
	$(BIN)/python -m pip install --quiet -c constraints-dev.txt torch
	$(BIN)/python -m pip install --quiet -c constraints-dev.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/xentkit explain "[[1, 0.5, 2], [0.5, 3, 1]]" "[2, 1]"
	$(BIN)/xentkit check
	$(BIN)/python examples/train_tiny_lm.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	$(BIN)/xentkit bench

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
