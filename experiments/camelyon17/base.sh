#!/usr/bin/env bash
# FedAvg / FedProx on the camelyon17 embeddings. Switch --algorithm between normal (FedAvg) and fedprox.
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-data/camelyon17/database}
for algorithm in normal fedprox; do
  "${PYTHON:-python}" train.py --db "$DB" --algorithm "$algorithm" --split natural --n-clients 5 --test-frac 0.2 --val-frac 0.25 \
    --rounds 50 --local-epochs 5 --batch-size 128 --lr 1e-3 --momentum 0.5 --weight-decay 5e-4 --mu 0.05 \
    --seeds 3407 12345 202502 "$@"
done
