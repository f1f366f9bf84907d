#!/usr/bin/env bash
# Table 1 on the camelyon17 embeddings: 17 rows (experiments/table1_grid.sh) x {natural} x 3 seeds, 5 clients, epsilon = 1, delta = 1e-4
# -> results/tables/table1_camelyon17{,_release}.{md,csv} and results/figures/. DB=..., OUT=..., SEEDS="..." override;
# extra flags go to train.py. Re-running continues an interrupted grid.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=camelyon17 DB=${DB:-data/camelyon17/database} SPLITS="natural" N_CLIENTS=5 bash experiments/table1_grid.sh --test-frac 0.2 --val-frac 0.25 "$@"
