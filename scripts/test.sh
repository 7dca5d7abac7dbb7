#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite, end-to-end FLARE simulator runs included.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python -m pytest tests "$@"
