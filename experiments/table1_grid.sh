#!/usr/bin/env bash
# The Table 1 grid of one dataset: FedAvg, FedProx, FedLambda, DP-CGAN, DP-CVAE (the papers' plan and its DP-aware
# preset), FedHypeVAE (likewise), DP-Gauss (defaults and its tuned presets), DP-FedAvg (alone and mixed with each
# client's local model), Local, Local with the balanced downstream recipe and Centralized
# x the splits in SPLITS x SEEDS, epsilon = 1, delta = 1e-4, then the tables and figures. experiments/<dataset>/table1.sh
# picks the values: DATASET (name in the results path), DB, SPLITS (iid, dirichlet, natural), N_CLIENTS, OUT, SEEDS.
# Finished runs are skipped and interrupted ones resume. Extra flags go to train.py (e.g. --threads 1). The rounds are
# the default (50) unless a preset plans fewer (the dp-tuned presets of dpcvae and fedhypevae).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
SEEDS=${SEEDS:-3407 12345 202502}
N_CLIENTS=${N_CLIENTS:-10}
# method[:preset] (python train.py --method M --help lists a method's presets; the run folders' tag names them):
# the papers' rows, DP-Gauss, the private-model yardstick DP-FedAvg and the strongest no-sharing one
rows=(fedavg fedprox fedlambda local centralized dpcvae dpcvae:dp-tuned dpcgan fedhypevae fedhypevae:dp-tuned
      dpgauss dpgauss:dp-tuned dpgauss:dp-tuned-local dpgauss:dp-tuned-sums dpgauss:dp-tuned-ess dpfedavg dpfedavg:mix
      local:balanced)
read -r -a splits <<< "$SPLITS"
step=0
for row in "${rows[@]}"; do
  method=${row%%:*}
  preset=()
  [[ $row == *:* ]] && preset=(--preset "${row#*:}")
  for split in "${splits[@]}"; do
    step=$((step + 1))
    echo "[${DATASET} table1 ${step}/$((${#splits[@]} * ${#rows[@]}))] ${row} ${split}"
    # shellcheck disable=SC2086  # SEEDS is a list
    "${PYTHON:-python}" train.py --db "$DB" --dataset-name "$DATASET" --method "$method" --split "$split" --alpha 0.3 \
      --n-clients "$N_CLIENTS" --epsilon 1.0 --delta 1e-4 "${preset[@]}" --seeds $SEEDS \
      --out "$OUT" "$@"
  done
done
"${PYTHON:-python}" experiments/tables.py --results "$OUT" --dataset "$DATASET" --out "$OUT/tables/table1_${DATASET}"
"${PYTHON:-python}" experiments/plots.py clients --results "$OUT" --dataset "$DATASET" --out "$OUT/figures/${DATASET}_clients.png"
first_seed=${SEEDS%% *}
for method in dpcvae dpcgan fedhypevae; do
  for run in "$OUT/$DATASET/$method"/*/"seed=$first_seed"; do
    [ -f "$run/results.json" ] || continue
    "${PYTHON:-python}" experiments/plots.py projection --run "$run" \
      --out "$OUT/figures/${DATASET}_projection_${method}_$(basename "$(dirname "$run")").png"
  done
done
