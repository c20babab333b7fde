#!/usr/bin/env bash
# Wheels of what launch/gpu_checks.sh needs beyond the `device` tool's image (which has torch, accelerate,
# peft, transformers, torchmetrics, huggingface_hub, matplotlib, tensorboard, but not these), for its
# Python 3.12, into .whl/ (git-ignored through .git/info/exclude). Run here, where PyPI is reachable.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 omegaconf==2.4.0 open_clip_torch==3.3.0 ftfy==6.3.1 \
  wcwidth==0.9.4 torch-fidelity==0.3.0
du -sh .whl
