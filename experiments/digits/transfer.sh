#!/usr/bin/env bash
# Do the presets (tuned on OrganAMNIST ViT-S/14 embeddings, 10 clients, alpha 0.3) carry to a dataset, a domain and
# a backbone nobody tuned on? scikit-learn's bundled handwritten digits (10 classes, 1,797 images: prepare.py)
# through ImageNet EfficientNet-Lite0 (1280-d, 128 px), 5 clients (about 215 training records each), Dirichlet
# alpha = 0.3, epsilon = 1, delta = 1e-4: Local and Local [balanced] beside DP-FedAvg [balanced_mix] and DP-Gauss's
# presets, then the tables. WEIGHTS=... points at the checkpoint (default: ../shared/weights; without it timm
# downloads ImageNet weights), IMAGES=..., DB=..., OUT=... override, SEEDS="..." sets the seeds, EPSILON the DP
# rows' budget (another than 1 adds tagged rows, e.g. [balanced_dp-tuned-sums_eps4]; nodp: the same rows without DP,
# the synthesizers' own ceiling); extra flags go to train.py (e.g. --threads 1). Centralized (pooled data, both
# recipes) is the ceiling of sharing. Re-running continues (the images and the database too).
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGES=${IMAGES:-results/datasets/digits}
DB=${DB:-results/databases/digits_effnetl0_128}
OUT=${OUT:-results/transfer}
WEIGHTS=${WEIGHTS:-../shared/weights/tf_efficientnet_lite0.safetensors}
weights=()
[[ -f $WEIGHTS ]] && weights=(--weights "$WEIGHTS")
[[ -f $IMAGES/labels.csv ]] || "${PYTHON:-python}" experiments/digits/prepare.py --out "$IMAGES"
"${PYTHON:-python}" data/create_db.py --dataset imagefolder --dataset-root "$IMAGES" --split-col split \
  --backbone tf_efficientnet_lite0 "${weights[@]}" --img-size 128 --database-root "$DB" --threads "${THREADS:-1}"
experiments/transfer_rows.sh "$DB" digits_effnetl0 5 "$OUT" "$@"
