#!/usr/bin/env bash
# Privacy-utility sweep: DP-CVAE and FedHypeVAE at epsilon in {0.5, 1, 2, 4, 8} and without DP (Dirichlet
# alpha = 0.3, 10 clients, delta = 1e-4), then a PNG of balanced accuracy and membership-attack AUC against
# epsilon. epsilon = 1 uses the default run folder, so Table 1's runs are reused. SEEDS="..." sets the seeds
# (default one seed: the sweep is 12 runs per seed); extra flags go to train.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-assets/organamnist_vits14_224}
OUT=${OUT:-results}
SEEDS=${SEEDS:-3407}
for method in dpcvae fedhypevae; do
  for eps in 0.5 1 2 4 8 nodp; do
    echo "[eps_sweep] ${method} epsilon=${eps}"
    case "$eps" in
      nodp) privacy=(--no-dp --tag nodp) ;;
      1) privacy=(--epsilon 1) ;;
      *) privacy=(--epsilon "$eps" --tag "eps${eps}") ;;
    esac
    # shellcheck disable=SC2086  # SEEDS is a list
    "${PYTHON:-python}" train.py --db "$DB" --method "$method" --split dirichlet --alpha 0.3 --n-clients 10 \
      --rounds 50 --delta 1e-4 "${privacy[@]}" --seeds $SEEDS --out "$OUT" "$@"
  done
done
"${PYTHON:-python}" experiments/plots.py sweep --results "$OUT" --dataset organamnist --split dirichlet \
  --out "$OUT/figures/eps_sweep.png"
