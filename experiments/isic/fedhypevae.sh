#!/usr/bin/env bash
# FedHypeVAE at epsilon = 1, delta = 1e-4, C = 1.5 (training + DP class statistics in one budget).
# --meta-codes K > 1 uses the mixture of meta-codes (Eq. 13).
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-data/isic/database}
"${PYTHON:-python}" train.py --db "$DB" --method fedhypevae --split dirichlet --alpha 0.3 --n-clients 10 \
  --rounds 50 --gen-local-epochs 5 --gen-batch-size 256 --hyper-lr 1e-3 \
  --code-dim 16 --code-radius 5 --lambda-mmd 0.1 --lambda-lip 1e-3 --lambda-v 1e-3 --meta-codes 1 \
  --epsilon 1.0 --delta 1e-4 --max-grad-norm 1.5 --accountant prv \
  --synthesis fill --seeds 3407 12345 202502 "$@"
