#!/usr/bin/env bash
# The GPU checks, as one prepared script for a borrowed GPU machine (no network there; its image has python3
# with torch, transformers, safetensors, typer, rich, peft, accelerate). Prepare here first:
#     bash benchmarks/gpu_prepare.sh
# then run it there from the repository root, carrying .gpu/:
#     run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540)
# It writes $OUT/gpu_check.json (copy it to docs/gpu_check.json) and $OUT/gpu_check.log.
# What it checks, on a synthetic bf16 LLaMA (hidden 2048, 12 blocks, ~0.7B parameters, built there from a
# config with the carried SmolLM2 tokenizer):
#   - streamed profile and prune (wanda, sparsegpt; --offload disk and none) on cuda, each run's
#     torch.cuda.max_memory_allocated (peak_cuda_mb) and wall time; streamed == in-memory checkpoints;
#   - eval perplexity on cuda; nm 2:4 fp16 + bench --backend torch-sparse (CUDA 2:4 kernels) vs torch;
#   - a 5-step LoRA finetune on cuda;
#   - the 1-GPU NCCL torchrun prune (benchmarks/gpu_distributed.sh, when present).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SITE=/tmp/owlctl-gpu-site
python3 -m pip install --quiet --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl
export PYTHONPATH="$PWD:$SITE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/nvidia-smi.txt" 2>&1
python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ -f benchmarks/gpu_distributed.sh ]; then
    bash benchmarks/gpu_distributed.sh 2>&1 | tee "$OUT/gpu_distributed.log"
fi
exit "$rc"
