#!/usr/bin/env bash
# The main job on the default data: ChEMBL (shared data) split over 3 simulated partners,
# MELLODDY-style federated multi-task training in the FLARE simulator, the single-partner
# baseline with identical settings, and the per-partner comparison table.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
pharmafl=".venv/bin/pharmafl"
out="${PHARMAFL_DEMO_DIR:-runs/demo}"
job="jobs/multitask_fedavg"
start=$(date +%s)
"$pharmafl" prepare chem --partners 3 --out "$out/data" --overwrite  # --overwrite: the demo owns $out
"$pharmafl" simulate "$job" --data "$out/data" --workspace "$out/workspace" --overwrite
# The single-partner baseline: the job's model and training code with its own number of rounds,
# chosen on the validation fold like the job's (scripts/tune_chem.py; docs/RESULTS.md).
"$pharmafl" baseline chem --data "$out/data" --out "$out/single_partner" --job "$job" --rounds 7
"$pharmafl" report "$out/workspace" --baseline "$out/single_partner"
echo "demo finished in $(( $(date +%s) - start )) s; report: $out/workspace/report/report.md"
