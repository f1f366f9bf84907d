#!/usr/bin/env bash
# Privacy-utility sweep: every DP method at epsilon in {0.5, 1, 2, 4, 8} and without DP (Dirichlet alpha = 0.3,
# 10 clients, delta = 1e-4), then a PNG of BACC, TSTR BACC and membership-attack AUC against epsilon, with the
# strongest Local row as the yardstick. Rows are method[:preset] as in Table 1; ROWS="..." picks some. The run
# folders name their point (..._eps2, ..._nodp); epsilon = 1 is Table 1's folder, so its runs are reused.
# SEEDS="..." sets the seeds (default one seed); extra flags go to train.py. Re-running continues.
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-assets/organamnist_vits14_224}
OUT=${OUT:-results}
SEEDS=${SEEDS:-3407}
read -r -a rows <<< "${ROWS:-dpcvae dpcgan fedhypevae dpgauss:dp-tuned dpgauss:dp-tuned-local dpgauss:dp-tuned-sums dpfedavg:mix}"
for row in "${rows[@]}" local:balanced; do
  method=${row%%:*}
  preset=()
  [[ $row == *:* ]] && preset=(--preset "${row#*:}")
  points=(0.5 1 2 4 8 nodp)
  [[ $method == local ]] && points=(none)  # the yardstick shares nothing: one run, no epsilon
  for eps in "${points[@]}"; do
    echo "[eps_sweep] ${row} epsilon=${eps}"
    case "$eps" in
      nodp) privacy=(--no-dp) ;;
      none) privacy=() ;;
      *) privacy=(--epsilon "$eps" --delta 1e-4) ;;
    esac
    # shellcheck disable=SC2086  # SEEDS is a list
    "${PYTHON:-python}" train.py --db "$DB" --dataset-name organamnist --method "$method" --split dirichlet --alpha 0.3 \
      --n-clients 10 --rounds 50 "${preset[@]}" "${privacy[@]}" --seeds $SEEDS --out "$OUT" "$@"
  done
done
"${PYTHON:-python}" experiments/plots.py sweep --results "$OUT" --dataset organamnist --split dirichlet \
  --out "$OUT/figures/eps_sweep.png"
