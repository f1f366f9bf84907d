#!/usr/bin/env bash
# DP-CVAE (the paper's method) and DP-CGAN at epsilon = 1, delta = 1e-4, C = 1.5, accounted over the whole run.
# Switch --anonymizer between cvae_fedavg (DP-CVAE) and cgan_fedavg (DP-CGAN).
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-data/camelyon17/database}
for anonymizer in cvae_fedavg cgan_fedavg; do
  "${PYTHON:-python}" train.py --db "$DB" --anonymizer "$anonymizer" --split natural --n-clients 5 --test-frac 0.2 --val-frac 0.25 \
    --rounds 50 --gen-local-epochs 5 --gen-batch-size 256 \
    --epsilon 1.0 --delta 1e-4 --max-grad-norm 1.5 --accountant prv \
    --synthesis fill --seeds 3407 12345 202502 "$@"
done
