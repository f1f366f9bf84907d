#!/usr/bin/env bash
# Do the presets (tuned with 10 clients at Dirichlet alpha = 0.3, tuning split) carry to a federation nobody tuned
# on? The embedded ViT-S/14 database split over 20 clients at Dirichlet alpha = 0.1 (smaller, more skewed
# clients), epsilon = 1, delta = 1e-4: Local and Local [balanced] beside DP-FedAvg [balanced_mix] and DP-Gauss
# [balanced_dp-tuned-sums], then the tables. DB=..., OUT=... override, SEEDS="..." sets the seeds, N_CLIENTS and
# ALPHA the split; extra flags go to train.py (e.g. --threads 1). Re-running continues.
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-assets/organamnist_vits14_224}
OUT=${OUT:-results/transfer}
SEEDS=${SEEDS:-3407 12345 202502}
for row in local local:balanced dpfedavg:mix dpgauss:dp-tuned-sums; do
  method=${row%%:*}
  flags=()
  [[ $row == *:* ]] && flags=(--preset "${row#*:}")
  [[ $method == local ]] || flags+=(--epsilon 1.0 --delta 1e-4)
  # shellcheck disable=SC2086  # SEEDS is a list
  "${PYTHON:-python}" train.py --db "$DB" --dataset-name organamnist --method "$method" "${flags[@]}" \
    --split dirichlet --alpha "${ALPHA:-0.1}" --n-clients "${N_CLIENTS:-20}" --seeds $SEEDS --out "$OUT" "$@"
done
"${PYTHON:-python}" experiments/tables.py --results "$OUT" --dataset organamnist --out "$OUT/table1_c${N_CLIENTS:-20}_alpha$(tr . p <<< "${ALPHA:-0.1}")"
