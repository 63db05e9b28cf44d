#!/usr/bin/env bash
# PPO, with the flags of MedicalGPT's current (2026) scripts/run_ppo.sh: --sft_model_path is the policy (it wins
# over --model_name_or_path), --reward_model_path a tunestack rm output (run_rm.sh). Prompts come from SFT data
# folders as they are, tool-call files included: a conversation's last answer is dropped, the rest is the prompt.
#   bash examples/medicalgpt/2026/run_sft.sh && bash examples/medicalgpt/2026/run_rm.sh && \
#       bash examples/medicalgpt/2026/run_ppo.sh
# SFT_MODEL (default: outputs-sft-v2 if present, else MODEL), REWARD_MODEL (default: outputs-rm-v2), DATA (default:
# examples/data/sft); see _launch.sh for the others.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
if [ -z "${SFT_MODEL:-}" ]; then
    if [ -f outputs-sft-v2/run.json ]; then SFT_MODEL=outputs-sft-v2; else SFT_MODEL="${MODEL}"; fi
fi
REWARD_MODEL="${REWARD_MODEL:-outputs-rm-v2}"
DATA="${DATA:-${DATA_ROOT}/sft}"
if [ ! -e "${REWARD_MODEL}" ]; then
    echo "run_ppo.sh: reward model ${REWARD_MODEL} not found: train one first (bash ${HERE}/run_rm.sh)" \
        "or set REWARD_MODEL" >&2
    exit 2
fi

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
launch "${NPROC:-1}" rl --algo ppo \
    --sft_model_path "${SFT_MODEL}" \
    --reward_model_path "${REWARD_MODEL}" \
    --model_name_or_path "${MODEL}" \
    --dtype bfloat16 \
    --train_file_dir "${DATA}" \
    --validation_file_dir "${DATA}" \
    --max_source_length 1024 \
    --max_completion_length 1000 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 4 \
    --gradient_checkpointing True \
    --do_train \
    --max_steps 3000 \
    --output_dir "${OUTPUT_DIR:-outputs-ppo-v2}" \
    --eval_strategy steps \
    --eval_steps 100 \
    --num_train_epochs 3 \
    --report_to tensorboard \
    ${EXTRA_ARGS:-}
