#!/usr/bin/env bash
# FedLambda (kNN-Per on embeddings): FedAvg global model + per-client kNN, lambda and k chosen on validation.
# --fedlambda-local linear --lambda-selection global reproduces the published code's variant.
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-data/camelyon17/database}
"${PYTHON:-python}" train.py --db "$DB" --method fedlambda --split natural --n-clients 5 --test-frac 0.2 --val-frac 0.25 \
  --rounds 50 --local-epochs 5 --batch-size 128 --lr 1e-3 --momentum 0.5 --weight-decay 5e-4 \
  --fedlambda-local knn --k-grid 5,10,20,50 --lambda-grid 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 \
  --seeds 3407 12345 202502 "$@"
