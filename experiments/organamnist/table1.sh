#!/usr/bin/env bash
# Table 1 on the organamnist embeddings: 17 rows (experiments/table1_grid.sh) x {iid, dirichlet} x 3 seeds, 10 clients, epsilon = 1, delta = 1e-4
# -> results/tables/table1_organamnist{,_release}.{md,csv} and results/figures/. DB=..., OUT=..., SEEDS="..." override;
# extra flags go to train.py. Re-running continues an interrupted grid.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=organamnist DB=${DB:-assets/organamnist_vits14_224} SPLITS="iid dirichlet" N_CLIENTS=10 bash experiments/table1_grid.sh "$@"
