#!/usr/bin/env bash
# Install m3 from this checkout, with optional extras: scripts/install.sh [dev|docs|scann|milvus].
# When no torch is importable, torch's CPU build is installed first, so that resolving m3's
# `torch` range never pulls a multi-GB CUDA build onto a CPU machine. Set M3_TORCH to install
# another torch (e.g. a CUDA build, or one from PyTorch's CPU wheel index on other machines).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086  # M3_TORCH may hold several pip arguments
  python -m pip install --quiet ${M3_TORCH:-torch==2.13.0}
fi
python -m pip install --quiet -e ".${1:+[$1]}"
