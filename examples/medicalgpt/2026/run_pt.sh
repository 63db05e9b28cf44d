#!/usr/bin/env bash
# Continued pretraining with LoRA, with the flags of MedicalGPT's current (2026) scripts/run_pt.sh.
#   bash examples/medicalgpt/2026/run_pt.sh
#   DATA=./data/pretrain NPROC=2 bash examples/medicalgpt/2026/run_pt.sh
# DATA: folder of .txt / .jsonl text (default: examples/data/pretrain); see _launch.sh for the others.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
DATA="${DATA:-${DATA_ROOT}/pretrain}"

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
launch "${NPROC:-2}" pt \
    --model_name_or_path "${MODEL}" \
    --train_file_dir "${DATA}" \
    --validation_file_dir "${DATA}" \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --do_train \
    --do_eval \
    --use_peft True \
    --seed 42 \
    --max_train_samples 10000 \
    --max_eval_samples 10 \
    --num_train_epochs 0.5 \
    --learning_rate 2e-4 \
    --warmup_steps 5 \
    --weight_decay 0.01 \
    --logging_strategy steps \
    --logging_steps 10 \
    --eval_steps 50 \
    --eval_strategy steps \
    --save_steps 500 \
    --save_strategy steps \
    --save_total_limit 13 \
    --gradient_accumulation_steps 8 \
    --preprocessing_num_workers 10 \
    --block_size 512 \
    --packing True \
    --output_dir "${OUTPUT_DIR:-outputs-pt-v2}" \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 \
    --report_to tensorboard \
    --ddp_find_unused_parameters False \
    --gradient_checkpointing True \
    --cache_dir ./cache \
    ${EXTRA_ARGS:-}
