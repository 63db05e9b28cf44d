#!/usr/bin/env bash
# ORPO with LoRA (no reference model), with the flags of MedicalGPT's current (2026) scripts/run_orpo.sh.
#   bash examples/medicalgpt/2026/run_orpo.sh
# DATA: folder of preference .jsonl (default: examples/data/reward); see _launch.sh for the others.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
DATA="${DATA:-${DATA_ROOT}/reward}"

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
launch "${NPROC:-1}" dpo --loss_type orpo \
    --model_name_or_path "${MODEL}" \
    --train_file_dir "${DATA}" \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --do_train \
    --do_eval \
    --use_peft True \
    --max_train_samples 1000 \
    --max_eval_samples 50 \
    --max_steps 100 \
    --eval_steps 20 \
    --save_steps 50 \
    --max_source_length 1024 \
    --max_target_length 512 \
    --output_dir "${OUTPUT_DIR:-outputs-orpo-v2}" \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 True \
    --report_to tensorboard \
    --remove_unused_columns False \
    --gradient_checkpointing True \
    --orpo_beta 0.1 \
    --cache_dir ./cache \
    ${EXTRA_ARGS:-}
