# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  ?= dev,triton,transformers

.PHONY: demo test bench format clean

# Local wheels (the CPU build of torch on this project's machines) are used when present.
WHEELS  := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

# uv installs torch in seconds where pip takes minutes; torch is pinned (constraints-dev.txt)
# to the CPU build so no requirement pulls a CUDA build.
$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(WHEELS) -c constraints-dev.txt \
		-e ".[$(EXTRAS)]"
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
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(WHEELS) -c constraints-dev.txt \
		-e ".[$(EXTRAS),bench]"
	$(BIN)/xentkit bench

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
