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

.PHONY: env run test lint docs clean

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

docs:
	$(MAKE) EXTRAS=test,doc,dimod,service env
	bash docs/build.sh

clean:
	rm -rf $(VENV) out docs/_build
