#!/usr/bin/env bash
# The demo: set up from nothing, make a synthetic data set in the competition's layout, check it, and train the
# 5-head model on it with settings that fit a CPU. Re-running reuses the venv and the data set.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/synthetic}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[dev]'
PY=.venv/bin/python
if [ ! -f "$DATA/train.csv" ]; then
  $PY -m src.make_synthetic --out "$DATA"
fi
$PY -m src.data "$DATA"
# Random-init ViT-S/14 on small tiles: the pipeline end to end, CPU-sized (pretrained weights arrive offline later).
$PY -m src.train_5head --base-path "$DATA" --fold-csv "$DATA/trainfold.csv" \
    --backbone vit_small_patch14_reg4_dinov2.lvd142m --no-pretrained --img-size 56 --grid 2 2 \
    --epochs ${EPOCHS:-6} --batch-size 16 --num-workers 2 --cache-images --lr 3e-4 --backbone-lr 3e-4 \
    --warmup-epochs 1 --use-log-target --stereo-correct-aug --stereo-swap-prob 0.5 --amp-dtype bfloat16 \
    --device-type cpu "$@"
