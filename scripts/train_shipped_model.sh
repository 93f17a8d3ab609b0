#!/usr/bin/env bash
# Reproduce the shipped checkpoint llmlab/checkpoints/tiny-char (ModelConfig.small, char-level, on
# llmlab.data.generate_corpus()). About 8 minutes on 2 CPU threads; the run is cut by the wall-time
# budget of TrainConfig.shipped() (max_seconds=450), so the number of steps, and the last digits of
# the loss, depend on the machine's speed. The held-out loss is written to config.json.
#   bash scripts/train_shipped_model.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-llmlab/checkpoints/tiny-char}"
# Passive OpenMP waiting: idle threads sleep instead of spinning, which matters on a shared CPU.
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/python -m llmlab.train --corpus generated --preset small --train-preset shipped \
    --threads 2 --no-progress --out "$OUT"
