#!/usr/bin/env bash
# Build the documentation: warnings are errors, every tutorial is executed.
#
#   bash docs/build.sh            # CI settings: small subsample, few epochs (a few minutes on 2 CPU cores)
#   SCQBM_TUTORIAL_CELLS=0 SCQBM_TUTORIAL_EPOCHS=30 SCQBM_TUTORIAL_SIM_CELLS=4000 bash docs/build.sh
#                                   # the notebooks' own defaults (tens of minutes)
#
# Called by `make docs` (which first installs the extras test,doc,dimod,service into .venv).
# The HTML lands in docs/_build/html/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    PYTHON=python3
fi

# Tutorial parameters, read by each notebook's `parameters` cell (whose own defaults are a
# full run). CI: a random subsample of the Kang PBMCs and few epochs. 0 cells means all cells.
export SCQBM_TUTORIAL_CELLS="${SCQBM_TUTORIAL_CELLS:-4000}"
export SCQBM_TUTORIAL_EPOCHS="${SCQBM_TUTORIAL_EPOCHS:-15}"
export SCQBM_TUTORIAL_SIM_CELLS="${SCQBM_TUTORIAL_SIM_CELLS:-2000}"
# myst-nb (docs/conf.py): execute every notebook on each build, stop the build at the first
# failing cell, and give up on a cell after this many seconds.
export SCQBM_DOCS_EXECUTE="${SCQBM_DOCS_EXECUTE:-force}"
export SCQBM_DOCS_NB_TIMEOUT="${SCQBM_DOCS_NB_TIMEOUT:-600}"
# No progress bars in the executed notebooks.
export TQDM_DISABLE=1
# One PyTorch (OpenMP) thread: the tutorials' networks are small, and on a shared 2-core machine
# two spinning threads per process made training up to 25x slower than one.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

rm -rf docs/_build/html docs/_build/doctrees docs/generated
start=$(date +%s)
# -W: warnings are errors (--keep-going lists them all first), unresolved cross-references to
# scqbm's own API included (nitpicky, docs/conf.py); -T: print the full traceback, which holds
# the failing cell of a notebook.
status=0
"$PYTHON" -m sphinx -W --keep-going -T -b html -d docs/_build/doctrees docs docs/_build/html \
    "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "docs build FAILED after $(($(date +%s) - start)) s" >&2
    exit "$status"
fi
echo "docs built in $(($(date +%s) - start)) s: docs/_build/html/index.html"
