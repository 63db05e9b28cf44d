#!/usr/bin/env bash
# Reward model with LoRA, with the flags of MedicalGPT's current (2026) scripts/run_rm.sh, on preference records
# written as `conversations` + `chosen` + `rejected` (optionally with `tools`).
#   bash examples/medicalgpt/2026/run_rm.sh
# DATA: folder of preference .jsonl (default: examples/data/reward); see _launch.sh for the others.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
DATA="${DATA:-${DATA_ROOT}/reward}"

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
launch "${NPROC:-1}" rm \
    --model_name_or_path "${MODEL}" \
    --train_file_dir "${DATA}" \
    --validation_file_dir "${DATA}" \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 8 \
    --per_device_eval_batch_size 4 \
    --do_train \
    --use_peft True \
    --seed 42 \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --num_train_epochs 1 \
    --learning_rate 2e-5 \
    --warmup_steps 5 \
    --weight_decay 0.001 \
    --logging_strategy steps \
    --logging_steps 10 \
    --eval_steps 50 \
    --eval_strategy steps \
    --save_steps 500 \
    --save_strategy steps \
    --save_total_limit 3 \
    --max_source_length 1024 \
    --max_target_length 256 \
    --output_dir "${OUTPUT_DIR:-outputs-rm-v2}" \
    --overwrite_output_dir \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --bf16 \
    --torch_dtype bfloat16 \
    --report_to tensorboard \
    --ddp_find_unused_parameters False \
    --remove_unused_columns False \
    --gradient_checkpointing True \
    ${EXTRA_ARGS:-}
