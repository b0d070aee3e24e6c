#!/usr/bin/env bash
# The device check (issue 20): what a GPU user runs once to learn whether the paper-scale path works and how fast.
# Under 8 minutes on one H100 (budgeted, not yet measured):
#   1. `pfedseq env`: versions, the device, bf16, and which selective scan runs (mamba-ssm's kernel or the loop);
#   2. the kernel against the loop at a paper-scale layer (forward and gradients; exits 1 past 1e-4 relative);
#   3. one paper-scale learner round (ViT-B/16's 12 LoRA layers, D = 24,576 per layer, N = 20, L = 15), with the
#      kernel and with the loop (PFEDSEQ_SCAN=loop; 2 of 12 layers timed);
#   4. one round of FedAvg with local heads on a ViT-B/16-shaped backbone (random weights, 224 px, 20 Omniglot
#      drawers x 100 drawings) in fp32, bf16 and fp16: img/s and peak GPU memory.
# Usage: bash benchmarks/gpu_check.sh [OUT]   (OUT: where the random ViT-B/16 is written, default runs/gpu_check)
# Without a GPU every step still runs (step 2 says there is nothing to compare), at CPU speed: set SMALL=1 to shrink
# steps 3-4 to a smoke test of the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-runs/gpu_check}
if [ "${SMALL:-0}" = 1 ]; then D=512; LAYERS=1; SIDE=32; PER_CLIENT=10; else D=24576; LAYERS=12; SIDE=224; PER_CLIENT=100; fi
echo "== 1. environment"; $PY -m fedml_pfedseq.cli env
echo "== 2. kernel vs loop"; $PY benchmarks/scan_check.py --rows "$D"
echo "== 3. learner round, kernel (if it runs) then loop"
$PY benchmarks/seq_learner_cost.py --only "$D" 20 15 "$LAYERS" 12 --threads 4
PFEDSEQ_SCAN=loop $PY benchmarks/seq_learner_cost.py --only "$D" 20 15 $(( LAYERS < 2 ? LAYERS : 2 )) 12 --threads 4
echo "== 4. a ViT-B/16-shaped federation round in fp32, bf16 and fp16"
$PY - "$OUT/vit-b16" "$SIDE" <<'PYTHON'
import sys
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
path, side = sys.argv[1], int(sys.argv[2])
ViTForImageClassification(ViTConfig(image_size=side)).save_pretrained(path)  # ViT-B/16's shape, random weights
ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(path)
PYTHON
for precision in fp32 bf16 fp16; do
  echo "-- mixed_precision: $precision"
  $PY benchmarks/round_time.py recipes/omniglot_fedavg_local_head.yaml --rounds 1 --set "model_args.model=$OUT/vit-b16" \
    --set "data_args.samples_per_client=$PER_CLIENT" --set "device_args.mixed_precision=$precision"
done
