# safealign: every target installs what it needs first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-full-size lint bench bench-full clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# CPU machines: take the CPU wheel first so pip does not pull a multi-GB CUDA build.
	# GPU machines (nvidia-smi present): let pip take the normal CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m safealign.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# the published SD 1.5 / SD 2.1-v / SDXL architectures (random weights) through `safealign run` at 64 px;
# SDXL needs ~30 GB of RAM
test-full-size: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -k full_size

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick || exit 1; done

bench-full: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf demo-out build dist src/*.egg-info
