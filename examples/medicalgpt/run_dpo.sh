#!/usr/bin/env bash
# DPO with LoRA, written like MedicalGPT's run_dpo.sh, run by tunestack (ORPO: EXTRA_ARGS="--loss_type orpo").
#
#   bash examples/medicalgpt/run_dpo.sh
#   MODEL=outputs-sft-v1 DATA=./data/reward bash examples/medicalgpt/run_dpo.sh
#
# Data: preference pairs, e.g. MedicalGPT's {"system", "history", "question", "response_chosen",
# "response_rejected"} or {"prompt", "chosen", "rejected"}. With LoRA the reference model is the start model
# with the adapter switched off, so only one copy of the model is in memory.
# Environment overrides:
#   MODEL       model to start from (usually the SFT output) (default: smollm2-135m-instruct)
#   DATA        folder of preference .jsonl files            (default: examples/demo/dpo next to this script)
#   TEMPLATE    chat template                                (default: qwen, the ChatML format of SmolLM2 and Qwen)
#   NPROC       processes (1: plain python, as MedicalGPT)   (default: 1)
#   OUTPUT_DIR  where the run is written                    (default: outputs-dpo-v1)
#   EXTRA_ARGS  more flags, appended last so they win, e.g. "--max_steps 4"
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-smollm2-135m-instruct}"
DATA="${DATA:-${HERE}/../demo/dpo}"
TEMPLATE="${TEMPLATE:-qwen}"
NPROC="${NPROC:-1}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs-dpo-v1}"
if [ "${NPROC}" -gt 1 ]; then
    LAUNCH=(torchrun --nproc_per_node "${NPROC}" -m tunestack)
else
    LAUNCH=(python -m tunestack)
fi

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
"${LAUNCH[@]}" dpo \
    --model_type auto \
    --model_name_or_path "${MODEL}" \
    --template_name "${TEMPLATE}" \
    --train_file_dir "${DATA}" \
    --validation_file_dir "${DATA}" \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 1 \
    --do_train \
    --do_eval \
    --use_peft True \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --max_steps 100 \
    --eval_steps 20 \
    --save_steps 50 \
    --max_source_length 1024 \
    --max_target_length 512 \
    --output_dir "${OUTPUT_DIR}" \
    --overwrite_output_dir \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --fp16 True \
    --device_map auto \
    --report_to tensorboard \
    --remove_unused_columns False \
    --gradient_checkpointing True \
    --cache_dir ./cache \
    ${EXTRA_ARGS:-}
