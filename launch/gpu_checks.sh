#!/usr/bin/env bash
# The GPU checks no CPU machine can run, as one script for a machine with an NVIDIA GPU:
#   1. CUDA-graph capture of the fast sampler equals its eager program (tests marked `gpu`);
#   2. the sampler benchmark's latency targets (configs/bench/sdxl_gpu.yaml: random-weight SDXL, 1024 px,
#      1 step, text encoding and decode included; targets <= 70 ms full VAE, <= 40 ms tiny VAE);
#   3. the DMD2 training iteration on the SD1.5 architecture, batch 8, 512 px (the official code: 597 ms;
#      ours: target <= 400 ms), and the SDXL 4-step LoRA recipe at batch 2 (target <= 1.3 s, <= 40 GiB);
#   4. the memory planner's prediction for both (`stepdistill plan`, run on the CPU with the GPU hidden:
#      it needs none) beside the peaks bench-train measured there (plan_*.json against train_*.md).
# FSDP2 needs two GPUs to shard anything: on a one-GPU machine it is the CPU tests' (gloo) job.
# Results go to $OUT (default gpu_checks/): pytest log, bench.md / bench.csv / bench.png, iteration tables.
#
# On a machine with stepdistill installed:   bash launch/gpu_checks.sh
# On a bare machine that lacks some packages and cannot reach PyPI (the `device` tool): fetch their
# wheels here first (bash launch/gpu_wheels.sh writes .whl/), carry .whl and run this script; it installs
# them into /tmp/site and runs stepdistill from this checkout.
set -uo pipefail
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 WANDB_MODE=offline
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/device.txt" || exit 1
status=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_sampler.py tests/test_faults.py 2>&1 | tee "$OUT/pytest_gpu.txt" || status=1
python3 -m stepdistill.cli bench --config configs/bench/sdxl_gpu.yaml --out "$OUT/bench_sdxl" 2>&1 \
  | tee "$OUT/bench_sdxl.log" || status=1
python3 -m stepdistill.cli bench-train --arch sd15 --batch-size 8 --every-step-generator --no-gradient-checkpointing \
  --out "$OUT/train_sd15_b8.md" 2>&1 | tee "$OUT/train_sd15_b8.log" || status=1
python3 -m stepdistill.cli bench-train --arch sdxl --config dmd2_sdxl_4step_lora \
  --out "$OUT/train_sdxl_lora_b2.md" 2>&1 | tee "$OUT/train_sdxl_lora_b2.log" || status=1
CUDA_VISIBLE_DEVICES= python3 -m stepdistill.cli plan --config dmd2_sd15 data.batch_size=8 --json --no-suggestions \
  roles.generator.gradient_checkpointing=false roles.critic.gradient_checkpointing=false \
  > "$OUT/plan_sd15_b8.json" || status=1
CUDA_VISIBLE_DEVICES= python3 -m stepdistill.cli plan --config dmd2_sdxl_4step_lora --json --no-suggestions \
  > "$OUT/plan_sdxl_lora_b2.json" || status=1
exit $status
