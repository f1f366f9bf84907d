#!/usr/bin/env bash
# DP-Gauss settings at epsilon = 1 on a tuning split (--split-seed 7; Table 1 uses 202502), ranked by the
# clients' validation BACC only (experiments/tuning.py). DB=..., OUT=..., SEEDS="..." override; extra
# flags go to train.py (e.g. --threads 1). Re-running continues the grid.
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-assets/organamnist_vits14_224}
OUT=${OUT:-results/tuning}
SEEDS=${SEEDS:-3407}
for share in 0.1 0.25; do
  for dims in 4 8 16; do
    for spread in 1 1.5 2; do
      # shellcheck disable=SC2086  # SEEDS is a list
      "${PYTHON:-python}" train.py --db "$DB" --dataset-name organamnist --method dpgauss --split dirichlet --alpha 0.3 \
        --n-clients 10 --split-seed 7 --epsilon 1.0 --delta 1e-4 --centre-share "$share" --pca-dims "$dims" \
        --clip-spread "$spread" --tag "tune_s${share}_d${dims}_k${spread}" --seeds $SEEDS --out "$OUT" "$@"
    done
  done
done
"${PYTHON:-python}" experiments/tuning.py --results "$OUT" --method dpgauss --json "$OUT/dpgauss_ranking.json"
