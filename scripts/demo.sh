#!/usr/bin/env bash
# Set up (if needed), generate sample inputs with a planted signal, run Step 5 on them
# with persistent workers, then predict with the saved model as Step 6 would.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
TRIALS=${TRIALS:-10}
$PY -m step5.data.sample --out sample_data --survivors 2000 --features 90 --seed 42
$PY meta_prediction_optimizer_anti_overfit.py \
    --survivors sample_data/survivors_with_scores.json \
    --lottery-data sample_data/train_history.json \
    --model-type neural_net --trials "$TRIALS" --k-folds 5 \
    --output-dir models/reinforcement --persistent-workers
$PY -m step5.predictor --model-dir models/reinforcement \
    --survivors sample_data/survivors_with_scores.json --output models/reinforcement/demo_predictions.json
echo "Demo done: model and sidecar in models/reinforcement/, pictures beside them." >&2
