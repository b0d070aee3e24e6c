#!/usr/bin/env bash
# Fills gpu_kit/ (ignored by git) with what benchmarks/gpu_check.sh needs beyond the GPU image's own packages, here,
# where a network exists: mamba-ssm's source at the version of pyproject's [cuda] extra (about 0.2 MB), which the
# check builds for the GPU's architecture if the build fits its time. Nothing else: the check's own modules import
# without datasets, evaluate, FedML and mamba-ssm (its REHEARSE=1 run, in the tests, proves it), and everything else
# they use is on the image (docs/benchmarks.md, "GPU check"). Carry the folder: run(..., carry=["gpu_kit"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
VERSION=$(sed -n 's/.*"mamba-ssm==\([^"]*\)".*/\1/p' pyproject.toml)
mkdir -p gpu_kit
$PY -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: "mamba-ssm==$VERSION" -d gpu_kit
du -sh gpu_kit && ls gpu_kit
