#!/usr/bin/env bash
# The rows of a transfer check on one database, then its tables: Local and Centralized (both recipes), the private
# model DP-FedAvg [balanced_mix] and DP-Gauss's presets, 3 seeds, Dirichlet alpha = 0.3, epsilon = 1, delta = 1e-4.
# Usage: experiments/transfer_rows.sh DB DATASET_NAME N_CLIENTS OUT [train.py flags...]. SEEDS="..." sets the seeds,
# EPSILON the DP rows' budget (another than 1 adds tagged rows; nodp: the same rows without DP). Re-running continues.
set -euo pipefail
cd "$(dirname "$0")/.."
db=$1 name=$2 n_clients=$3 out=$4
shift 4
for row in local local:balanced centralized centralized:balanced dpfedavg:mix dpgauss:dp-tuned dpgauss:dp-tuned-sums \
  dpgauss:dp-tuned-ess; do
  method=${row%%:*}
  flags=()
  [[ $row == *:* ]] && flags=(--preset "${row#*:}")
  case "$method:${EPSILON:-1.0}" in
    local:* | centralized:*) ;;
    *:nodp) flags+=(--no-dp) ;;
    *) flags+=(--epsilon "${EPSILON:-1.0}" --delta 1e-4) ;;
  esac
  # shellcheck disable=SC2086  # SEEDS is a list
  "${PYTHON:-python}" train.py --db "$db" --dataset-name "$name" --method "$method" "${flags[@]}" \
    --split dirichlet --alpha 0.3 --n-clients "$n_clients" --seeds ${SEEDS:-3407 12345 202502} --out "$out" "$@"
done
"${PYTHON:-python}" experiments/tables.py --results "$out" --dataset "$name" --out "$out/table1_$name"
