# Quick start: `make run` (the main job) and `make test` (the test suite).
# Both create or reuse the virtual environment in .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 is what these machines have locally; an unpinned torch would
# pull a multi-GB CUDA build. Elsewhere: make TORCH_SPEC=torch TORCH_INDEX="--index-url <cpu index>"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= test
STAMP := $(VENV)/.installed-$(EXTRAS)

# The second supported stack: Python 3.12 with the current scvi-tools (1.5.x needs >= 3.12).
# Its environment is cached outside the clone (about 6 GB: torch 2.13.0 is the CUDA build on
# 3.12) and refreshed when pyproject.toml changes; scqbm itself is re-linked on every run.
# The first candidate that really runs Python 3.12 (a pyenv shim for a version that is not
# selected exists but fails).
PY312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	if $$p -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1; then \
	command -v $$p; break; fi; done)
PY312_VENV ?= $(HOME)/.cache/scqbm/venv-py312
PY312_SCVI ?= scvi-tools==1.5.1
PY312_STAMP = $(PY312_VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: env run test lint docs clean env-py312 test-py312

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

env: $(STAMP)

# The main job: QBMVAE on the Kang IFN-beta PBMCs, embedding + UMAP written to out/.
run: $(STAMP)
	$(BIN)/scqbm integrate --out out/kang_qbmvae.h5ad --plot out/kang_qbmvae_umap.png

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

$(PY312_STAMP): pyproject.toml
	@test -n "$(PY312)" || { echo "No Python 3.12 found: make PY312=/path/to/python3.12" >&2; exit 1; }
	test -x $(PY312_VENV)/bin/python || $(PY312) -m venv $(PY312_VENV)
	$(PY312_VENV)/bin/python -m pip install -q --upgrade pip
	$(PY312_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX) "$(PY312_SCVI)"
	# Installing scqbm next to an existing scvi-tools must leave its version alone.
	before=$$($(PY312_VENV)/bin/python -m pip show scvi-tools | grep ^Version); \
	$(PY312_VENV)/bin/python -m pip install -q -e ".[test]" && \
	after=$$($(PY312_VENV)/bin/python -m pip show scvi-tools | grep ^Version); \
	echo "scvi-tools $$before -> $$after"; test "$$before" = "$$after"
	rm -f $(PY312_VENV)/.installed-*
	touch $@

env-py312: $(PY312_STAMP)
	# Point the cached environment's editable install at this checkout.
	$(PY312_VENV)/bin/python -m pip install -q --no-deps -e .

test-py312: env-py312
	$(PY312_VENV)/bin/python -m pytest -q

docs:
	$(MAKE) EXTRAS=test,doc,dimod,service env
	bash docs/build.sh

clean:
	rm -rf $(VENV) out docs/_build
