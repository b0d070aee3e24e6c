#!/usr/bin/env bash
# The GPU check (issues 20, 30): one command on an offline GPU machine as it comes (python3 with torch, transformers,
# peft, accelerate, Triton and nvcc; no datasets, evaluate, FedML or mamba-ssm, no network). Nothing is installed
# from a network: the modules it runs import without those packages, and mamba-ssm's source comes in gpu_kit/,
# which `bash benchmarks/gpu_kit.sh` fills where a network exists (ignored by git: carry it to the machine).
#   1. the environment: versions, the device, bf16, and which scan CUDA and CPU tensors get;
#   2. mamba-ssm's kernel built from gpu_kit/'s source for this GPU's architecture only, if the build finishes
#      within MAMBA_BUILD_SECONDS (default 240); else it is stopped and the learner's CUDA scan is the loop;
#   3. that kernel against the loop at a paper-scale layer (forward and gradients; exits 1 past 1e-4 relative);
#   4. one paper-scale learner round (12 layers x D = 24,576, N = 20, L = 15) with the scan that runs, then with
#      the loop (PFEDSEQ_SCAN=loop; 2 of 12 layers timed);
#   5. a ViT-B/16-shaped pFedSeq round in bf16 on synthetic images (benchmarks/gpu_round.py).
# Usage: bash benchmarks/gpu_check.sh   (PYTHON: the interpreter, default python3)
# REHEARSE=1 runs every step at small shapes with the packages the GPU image lacks made unimportable
# (benchmarks/gpu_rehearsal/sitecustomize.py): the CPU rehearsal, run by tests/test_gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KIT=${KIT:-gpu_kit}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${REHEARSE:-0}" = 1 ]; then
  export PYTHONPATH="$PWD/benchmarks/gpu_rehearsal:$PYTHONPATH"
  D=512; LAYERS=1; SMALL=--small
else
  D=24576; LAYERS=12; SMALL=
fi

echo "== 1. environment"
$PY -c "from fedml_pfedseq.environment import describe
for what, value in describe(): print(f'{what}: {value}')"

echo "== 2. mamba-ssm's kernel from $KIT/"
SOURCE=$(ls "$KIT"/mamba_ssm-*.tar.gz 2>/dev/null | head -1 || true)
ARCH=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else '')")
if [ -z "$SOURCE" ] || [ -z "$ARCH" ] || ! command -v nvcc >/dev/null; then
  echo "not built: ${SOURCE:-no source in $KIT/}, ${ARCH:-no CUDA device}, nvcc $(command -v nvcc || echo missing)"
else
  BUILD=$(mktemp -d)
  tar xzf "$SOURCE" -C "$BUILD"
  # only this GPU's architecture (mamba-ssm's setup.py lists every one it supports, each a full compile)
  $PY - "$BUILD"/mamba_ssm-*/setup.py "$ARCH" <<'PYTHON'
import re, sys
path, arch = sys.argv[1], sys.argv[2]
text = open(path).read()
pairs = r'cc_flag\.append\("-gencode"\)\s*\n\s*cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)'
kept = re.sub(pairs, lambda m: m.group(0) if m.group(1) == arch else "pass", text)
open(path, "w").write(kept)
print(f"building for sm_{arch} only")
PYTHON
  started=$(date +%s)
  if timeout "${MAMBA_BUILD_SECONDS:-240}" env MAMBA_FORCE_BUILD=TRUE MAX_JOBS="$(nproc)" \
      $PY -m pip install --no-build-isolation --no-deps --no-index --target "$BUILD/site" "$BUILD"/mamba_ssm-*/ \
      > "$BUILD/build.log" 2>&1; then
    export PYTHONPATH="$BUILD/site:$PYTHONPATH"
    echo "built in $(( $(date +%s) - started )) s"
  else
    pkill -f "$BUILD" 2>/dev/null || true  # compilers the build started outlive the pip that timeout stopped
    echo "not built within ${MAMBA_BUILD_SECONDS:-240} s (or failed; log: $BUILD/build.log): the learner's CUDA scan is the loop"
    tail -3 "$BUILD/build.log"
  fi
fi

echo "== 3. kernel vs loop"
$PY benchmarks/scan_check.py --rows "$D"

echo "== 4. learner round, the scan that runs, then the loop"
$PY benchmarks/seq_learner_cost.py --only "$D" 20 15 "$LAYERS" 12 --threads 4
PFEDSEQ_SCAN=loop $PY benchmarks/seq_learner_cost.py --only "$D" 20 15 $(( LAYERS < 2 ? LAYERS : 2 )) 12 --threads 4

echo "== 5. a ViT-B/16-shaped pFedSeq round in bf16"
$PY benchmarks/gpu_round.py --precision bf16 $SMALL
