#!/usr/bin/env bash
# The GPU path in one run (issue 19): on a lent GPU machine, under 8 minutes, prints
#   1. the diffusion U-Net's training throughput through genlab's Lightning path against the hand
#      loop, CIFAR-sized (3x32x32, 256 levels), bf16-mixed, channels_last, torch.compile, with its
#      model-FLOPs utilisation (benchmarks/overhead.py);
#   2. the same in fp32 (32-true), so bf16 against fp32;
#   3. one two-process DDP step (two GPUs with NCCL where there are, else both on one via gloo),
#      with the check that both ranks hold the same parameters after it (benchmarks/ddp_step.py);
#   4. the families' throughput and peak memory at the default settings (benchmarks/families.py).
# Run from the repository root:  bash benchmarks/gpu_check.sh
# CI never needs a GPU; on a machine without one this says so and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet uv
fi
uv sync --locked --quiet
if ! uv run python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here" >&2
  exit 1
fi
uv run python -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| torch', torch.__version__)"

unet=(--family diffusion --accelerator gpu --cifar --images 20000 --runs 1 --epochs 3
      --set models.diffusion.channels=128 --set models.diffusion.batch_size=256)
echo "== 1. diffusion U-Net, bf16-mixed, channels_last, compiled: Lightning vs hand loop, MFU"
timeout 200 uv run python benchmarks/overhead.py "${unet[@]}" --channels-last --compile
echo "== 2. the same in fp32, not compiled"
timeout 120 uv run python benchmarks/overhead.py "${unet[@]}" --precision 32-true
echo "== 3. one DDP step in two processes"
timeout 60 uv run python benchmarks/ddp_step.py --batch 256
echo "== 4. every family at the default settings"
timeout 90 uv run python benchmarks/families.py --accelerator gpu --quick
