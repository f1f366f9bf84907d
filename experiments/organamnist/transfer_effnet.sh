#!/usr/bin/env bash
# Do the DP-Gauss presets (tuned on the ViT-S/14 embeddings, tuning split) carry to a backbone nobody tuned on?
# OrganAMNIST through ImageNet EfficientNet-Lite0 (1280-d, 128 px; the same stratified 8,000/6,491/8,000 subset as
# the embedded database), Dirichlet alpha = 0.3, 10 clients, epsilon = 1, delta = 1e-4: the no-sharing rows
# Local and Local [balanced] beside DP-Gauss's presets, then the tables. WEIGHTS=... points at the checkpoint (default:
# ../shared/weights; without it timm downloads ImageNet weights), DB=... and OUT=... override, SEEDS="..." sets
# the seeds; extra flags go to train.py (e.g. --threads 1). Re-running continues (the database too).
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-results/databases/organamnist_effnetl0_128}
OUT=${OUT:-results/transfer}
SEEDS=${SEEDS:-3407 12345 202502}
WEIGHTS=${WEIGHTS:-../shared/weights/tf_efficientnet_lite0.safetensors}
weights=()
[[ -f $WEIGHTS ]] && weights=(--weights "$WEIGHTS")
"${PYTHON:-python}" data/create_db.py --dataset organamnist --dataset-root "${DATA_ROOT:-../shared/data}" --size 28 \
  --backbone tf_efficientnet_lite0 "${weights[@]}" --img-size 128 --limit 8000 --subset-seed 0 --database-root "$DB" \
  --threads "${THREADS:-1}"
for row in local local:balanced dpgauss:dp-tuned dpgauss:dp-tuned-local dpgauss:dp-tuned-sums; do
  method=${row%%:*}
  flags=()
  [[ $row == *:* ]] && flags=(--preset "${row#*:}")
  [[ $method == local ]] || flags+=(--epsilon 1.0 --delta 1e-4)
  # shellcheck disable=SC2086  # SEEDS is a list
  "${PYTHON:-python}" train.py --db "$DB" --dataset-name organamnist_effnetl0 --method "$method" "${flags[@]}" \
    --split dirichlet --alpha 0.3 --n-clients 10 --seeds $SEEDS --out "$OUT" "$@"
done
"${PYTHON:-python}" experiments/tables.py --results "$OUT" --dataset organamnist_effnetl0 --out "$OUT/table1_effnetl0"
