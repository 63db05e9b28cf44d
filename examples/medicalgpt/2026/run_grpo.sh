#!/usr/bin/env bash
# GRPO with LoRA, with the flags of MedicalGPT's current (2026) scripts/run_grpo.sh, on question/answer records:
# with no --reward_funcs or --reward_model given, each completion is scored by the accuracy reward against its
# record's `answer` (1 when the answer part matches, numbers compared as numbers), as MedicalGPT does.
#   bash examples/medicalgpt/2026/run_grpo.sh
# DATA: folder of {"question", "answer"} .jsonl (default: examples/data/grpo); see _launch.sh for the others.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
DATA="${DATA:-${DATA_ROOT}/grpo}"

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
launch "${NPROC:-2}" rl --algo grpo \
    --model_name_or_path "${MODEL}" \
    --train_file_dir "${DATA}" \
    --train_samples -1 \
    --max_steps -1 --num_train_epochs 1 \
    --save_steps 50 \
    --save_strategy steps \
    --save_total_limit 13 \
    --output_dir "${OUTPUT_DIR:-outputs-grpo-v2}" \
    --dtype bfloat16 \
    --bf16 True \
    --report_to tensorboard \
    --remove_unused_columns False \
    --gradient_checkpointing False \
    --beta 0.001 \
    --learning_rate 5.0e-7 \
    --lr_scheduler_type cosine \
    --warmup_ratio 0.03 \
    --use_vllm False \
    --logging_steps 10 \
    --use_peft True \
    --qlora False \
    --load_in_4bit False \
    --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
    --lora_r 16 \
    --lora_alpha 32 \
    --lora_dropout 0.1 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 1 \
    --num_generations 4 \
    --gradient_accumulation_steps 1 \
    --max_completion_length 512 \
    ${EXTRA_ARGS:-}
