#!/usr/bin/env bash
# The main job on the default data: ChEMBL (shared data) split over 3 simulated partners that each
# own a chemically distinct compound library (--partition libraries), MELLODDY-style federated
# multi-task training in the FLARE simulator, the single-partner baseline with identical settings
# and rounds, and the per-partner comparison table (deltas, tasks improved, Wilcoxon p-values).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
pharmafl=".venv/bin/pharmafl"
out="${PHARMAFL_DEMO_DIR:-runs/demo}"
job="jobs/multitask_fedavg"
start=$(date +%s)
"$pharmafl" prepare chem --partners 3 --partition libraries --out "$out/data" --overwrite  # the demo owns $out
"$pharmafl" simulate "$job" --data "$out/data" --workspace "$out/workspace" --overwrite
# The single-partner baseline: the job's model, training code and rounds (docs/RESULTS.md).
"$pharmafl" baseline chem --data "$out/data" --out "$out/single_partner" --job "$job"
"$pharmafl" report "$out/workspace" --baseline "$out/single_partner"
echo "demo finished in $(( $(date +%s) - start )) s; report: $out/workspace/report/report.md"
