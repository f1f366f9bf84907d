#!/usr/bin/env bash
# Table 1 on the OrganAMNIST embeddings: FedAvg, FedProx, FedLambda, DP-CGAN, DP-CVAE, FedHypeVAE, Local and
# Centralized x {IID, Dirichlet alpha = 0.3} x 3 seeds, 10 clients, epsilon = 1, delta = 1e-4. Finished runs
# are skipped and interrupted ones resume, so re-running continues the grid. Extra flags go to train.py
# (e.g. --threads 1); OUT=dir changes the results root, SEEDS="..." the seeds.
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-assets/organamnist_vits14_224}
OUT=${OUT:-results}
SEEDS=${SEEDS:-3407 12345 202502}
methods=(fedavg fedprox fedlambda local centralized dpcvae dpcgan fedhypevae)
step=0
for method in "${methods[@]}"; do
  for split in iid dirichlet; do
    step=$((step + 1))
    echo "[table1 ${step}/$((2 * ${#methods[@]}))] ${method} ${split}"
    # shellcheck disable=SC2086  # SEEDS is a list
    "${PYTHON:-python}" train.py --db "$DB" --method "$method" --split "$split" --alpha 0.3 --n-clients 10 \
      --rounds 50 --epsilon 1.0 --delta 1e-4 --seeds $SEEDS --out "$OUT" "$@"
  done
done
"${PYTHON:-python}" experiments/tables.py --results "$OUT" --dataset organamnist --out "$OUT/tables/table1"
"${PYTHON:-python}" experiments/plots.py clients --results "$OUT" --dataset organamnist --out "$OUT/figures/table1_clients.png"
first_seed=${SEEDS%% *}
for method in dpcvae dpcgan fedhypevae; do
  for tag in iid_c10 dirichlet_a0.3_c10; do
    "${PYTHON:-python}" experiments/plots.py projection --run "$OUT/organamnist/$method/$tag/seed=$first_seed" \
      --out "$OUT/figures/projection_${method}_${tag}.png"
  done
done
