#!/usr/bin/env bash
# Supervised fine-tuning (SFT) with LoRA, written like MedicalGPT's run_sft.sh, run by tunestack.
#
#   bash examples/medicalgpt/run_sft.sh
#   MODEL=outputs-pt-v1 DATA=./data/finetune NPROC=2 bash examples/medicalgpt/run_sft.sh
#
# Offline: MODEL is a local folder, a .gguf file, a tunestack output folder (e.g. outputs-pt-v1 from run_pt.sh)
# or a built-in alias. Environment overrides:
#   MODEL       model to train                        (default: smollm2-135m-instruct, the embedded SmolLM2)
#   DATA        folder of ShareGPT/alpaca .jsonl files (default: examples/demo/sft next to this script)
#   TEMPLATE    chat template                         (default: qwen, the ChatML format SmolLM2 and Qwen use)
#   NPROC       processes for torchrun, one per GPU   (default: the number of GPUs, 1 without one)
#   OUTPUT_DIR  where the run is written             (default: outputs-sft-v1)
#   EXTRA_ARGS  more flags, appended last so they win, e.g. "--max_steps 4 --model_max_length 256"
# The adapter in OUTPUT_DIR feeds the next stage directly: --model_name_or_path outputs-sft-v1
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-smollm2-135m-instruct}"
DATA="${DATA:-${HERE}/../demo/sft}"
TEMPLATE="${TEMPLATE:-qwen}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs-sft-v1}"
if [ -z "${NPROC:-}" ]; then
    NPROC="$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
torchrun --nproc_per_node "${NPROC}" -m tunestack sft \
    --model_type auto \
    --model_name_or_path "${MODEL}" \
    --train_file_dir "${DATA}" \
    --validation_file_dir "${DATA}" \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --do_train \
    --do_eval \
    --template_name "${TEMPLATE}" \
    --use_peft True \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --model_max_length 4096 \
    --num_train_epochs 1 \
    --learning_rate 2e-5 \
    --warmup_ratio 0.05 \
    --weight_decay 0.05 \
    --logging_strategy steps \
    --logging_steps 10 \
    --eval_steps 50 \
    --evaluation_strategy steps \
    --save_steps 500 \
    --save_strategy steps \
    --save_total_limit 13 \
    --gradient_accumulation_steps 1 \
    --preprocessing_num_workers 4 \
    --output_dir "${OUTPUT_DIR}" \
    --overwrite_output_dir \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 \
    --device_map auto \
    --report_to tensorboard \
    --ddp_find_unused_parameters False \
    --gradient_checkpointing True \
    --cache_dir ./cache \
    ${EXTRA_ARGS:-}
