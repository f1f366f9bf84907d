#!/usr/bin/env bash
# Do the presets (tuned on OrganAMNIST ViT-S/14 embeddings, 10 clients, alpha 0.3) carry to a medical dataset nobody
# tuned on? Official BloodMNIST (blood-cell microscopy, 8 classes, 28x28 RGB; 11,959 / 1,712 / 3,421) through
# BACKBONE=effnetl0 (default: ImageNet EfficientNet-Lite0, 1280-d, 128 px: a backbone nobody tuned on either) or
# BACKBONE=vits14 (the tuned DINOv2-initialised ViT-S/14, 384-d, 112 px), 10 clients, Dirichlet alpha = 0.3,
# epsilon = 1, delta = 1e-4: Local, Local [balanced] and Centralized (both recipes) beside DP-FedAvg [balanced_mix]
# and DP-Gauss's presets, then the tables. DATA_ROOT=... holds bloodmnist.npz (MD5 in medmnist.INFO; without it
# medmnist downloads it), WEIGHTS=... the backbone's checkpoint (default: ../shared/weights; without it timm downloads
# the pretrained weights), DB=... and OUT=... override, SEEDS="..." sets the seeds, EPSILON the DP rows' budget
# (another than 1 adds tagged rows; nodp: without DP); extra flags go to train.py (e.g. --threads 1). Re-running
# continues (the database too).
set -euo pipefail
cd "$(dirname "$0")/../.."
BACKBONE=${BACKBONE:-effnetl0}
case "$BACKBONE" in
  effnetl0) model=tf_efficientnet_lite0 size=128 file=tf_efficientnet_lite0.safetensors ;;
  vits14) model=vit_small_patch14_dinov2.lvd142m size=112 file=vit_small_patch14_dinov2_imgfocus.safetensors ;;
  *) echo "BACKBONE=$BACKBONE is unknown; valid: effnetl0, vits14" >&2; exit 2 ;;
esac
DATA_ROOT=${DATA_ROOT:-results/datasets/medmnist}
DB=${DB:-results/databases/bloodmnist_${BACKBONE}_$size}
OUT=${OUT:-results/transfer}
WEIGHTS=${WEIGHTS:-../shared/weights/$file}
weights=() download=()
[[ -f $WEIGHTS ]] && weights=(--weights "$WEIGHTS")
[[ -f $DATA_ROOT/bloodmnist.npz ]] || download=(--download)
"${PYTHON:-python}" data/create_db.py --dataset bloodmnist --dataset-root "$DATA_ROOT" --size 28 "${download[@]}" \
  --backbone "$model" "${weights[@]}" --img-size "$size" --database-root "$DB" --threads "${THREADS:-1}"
experiments/transfer_rows.sh "$DB" "bloodmnist_$BACKBONE" 10 "$OUT" "$@"
