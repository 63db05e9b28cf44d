#!/usr/bin/env bash
# SFT with LoRA, with the flags of MedicalGPT's current (2026) scripts/run_sft.sh: its data folder mixes ShareGPT
# chats with glaive-style tool calls (function_call / observation turns and a `tools` field), trained in the
# default tool format ("Action: name / Action Input: {json}"), which is saved with the model for chat and serve.
#   bash examples/medicalgpt/2026/run_sft.sh
#   DATA=./data/sft NPROC=2 bash examples/medicalgpt/2026/run_sft.sh
# DATA: folder of ShareGPT / messages .jsonl (default: examples/data/sft); see _launch.sh for the others.
# --flash_attn True uses FlashAttention-2 where the flash-attn package and a CUDA GPU are there, else SDPA.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
DATA="${DATA:-${DATA_ROOT}/sft}"

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
launch "${NPROC:-2}" sft \
    --model_name_or_path "${MODEL}" \
    --train_file_dir "${DATA}" \
    --validation_file_dir "${DATA}" \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 1 \
    --do_train \
    --do_eval \
    --use_peft True \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --model_max_length 512 \
    --num_train_epochs 1 \
    --learning_rate 2e-5 \
    --warmup_steps 5 \
    --weight_decay 0.05 \
    --logging_strategy steps \
    --logging_steps 10 \
    --eval_steps 50 \
    --eval_strategy steps \
    --save_steps 500 \
    --save_strategy steps \
    --save_total_limit 13 \
    --gradient_accumulation_steps 8 \
    --preprocessing_num_workers 4 \
    --output_dir "${OUTPUT_DIR:-outputs-sft-v2}" \
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
    --tool_format default \
    --cache_dir ./cache --flash_attn True \
    ${EXTRA_ARGS:-}
