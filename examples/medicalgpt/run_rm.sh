#!/usr/bin/env bash
# Reward modeling (RM) with LoRA, written like MedicalGPT's run_rm.sh, run by tunestack.
#
#   bash examples/medicalgpt/run_rm.sh
#   MODEL=outputs-sft-v1 DATA=./data/reward bash examples/medicalgpt/run_rm.sh
#
# MedicalGPT trains the reward model with plain `python` (its script does not support torchrun); tunestack's rm
# does, so NPROC > 1 starts it under torchrun. Data: preference pairs, e.g. MedicalGPT's
# {"system", "history", "question", "response_chosen", "response_rejected"} or {"prompt", "chosen", "rejected"}.
# Environment overrides:
#   MODEL       model to start from (usually the SFT output)  (default: smollm2-135m-instruct)
#   DATA        folder of preference .jsonl files             (default: examples/demo/dpo next to this script)
#   NPROC       processes (1: plain python, as MedicalGPT)    (default: 1)
#   OUTPUT_DIR  where the run is written                     (default: outputs-rm-v1)
#   EXTRA_ARGS  more flags, appended last so they win, e.g. "--max_steps 4"
# The reward model in OUTPUT_DIR is what run_ppo.sh scores with: REWARD_MODEL=outputs-rm-v1
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-smollm2-135m-instruct}"
DATA="${DATA:-${HERE}/../demo/dpo}"
NPROC="${NPROC:-1}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs-rm-v1}"
if [ "${NPROC}" -gt 1 ]; then
    LAUNCH=(torchrun --nproc_per_node "${NPROC}" -m tunestack)
else
    LAUNCH=(python -m tunestack)
fi

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
"${LAUNCH[@]}" rm \
    --model_type auto \
    --model_name_or_path "${MODEL}" \
    --train_file_dir "${DATA}" \
    --validation_file_dir "${DATA}" \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --do_train \
    --use_peft True \
    --seed 42 \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --num_train_epochs 1 \
    --learning_rate 2e-5 \
    --warmup_ratio 0.05 \
    --weight_decay 0.001 \
    --logging_strategy steps \
    --logging_steps 10 \
    --eval_steps 50 \
    --evaluation_strategy steps \
    --save_steps 500 \
    --save_strategy steps \
    --save_total_limit 3 \
    --max_source_length 1024 \
    --max_target_length 256 \
    --output_dir "${OUTPUT_DIR}" \
    --overwrite_output_dir \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype float32 \
    --device_map auto \
    --report_to tensorboard \
    --ddp_find_unused_parameters False \
    --remove_unused_columns False \
    --gradient_checkpointing True \
    ${EXTRA_ARGS:-}
