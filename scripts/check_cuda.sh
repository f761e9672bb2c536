#!/usr/bin/env bash
# Run the model equivalence tests on a CUDA device in bf16 (the same tests CI runs on the CPU
# in fp32: one-pass prompts, cached decoding through the memory region, gradients). Needs a
# GPU; CI never runs this.
#   scripts/check_cuda.sh [--dtype bfloat16|float16|float32]
set -euo pipefail
cd "$(dirname "$0")/.."
dtype=bfloat16
if [ "${1:-}" = "--dtype" ]; then dtype=$2; fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest tests/test_model.py --device cuda --dtype "$dtype" -q
