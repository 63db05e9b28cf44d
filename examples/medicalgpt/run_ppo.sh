#!/usr/bin/env bash
# PPO against a reward model, with LoRA, written like MedicalGPT's run_ppo.sh, run by tunestack.
#
#   bash examples/medicalgpt/run_sft.sh && bash examples/medicalgpt/run_rm.sh && bash examples/medicalgpt/run_ppo.sh
#   MODEL=outputs-sft-v1 REWARD_MODEL=outputs-rm-v1 DATA=./data/finetune bash examples/medicalgpt/run_ppo.sh
#
# tunestack runs its own PPO loop (TRL 1.x has no PPOTrainer), so the 2024 script's flags keep working; stage
# output folders are model references, so the SFT and RM outputs need no merge first (merged folders work too).
# Prompts: SFT-format files (their questions are used) or {"prompt": ...} records.
# Environment overrides:
#   MODEL         the policy to train (usually the SFT output) (default: outputs-sft-v1 if present, else
#                 smollm2-135m-instruct)
#   REWARD_MODEL  a tunestack rm output                        (default: outputs-rm-v1, from run_rm.sh)
#   DATA          folder of prompt files                       (default: examples/demo/rl next to this script)
#   NPROC         processes (1: plain python, as MedicalGPT)   (default: 1)
#   OUTPUT_DIR    where the run is written                    (default: outputs-rl-v1)
#   DTYPE         weights dtype: MedicalGPT's script says float16, a GPU setting (default: float32, for CPUs)
#   EXTRA_ARGS    more flags, appended last so they win, e.g. "--max_steps 2 --max_target_length 16"
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${MODEL:-}" ]; then
    if [ -f outputs-sft-v1/run.json ]; then MODEL=outputs-sft-v1; else MODEL=smollm2-135m-instruct; fi
fi
REWARD_MODEL="${REWARD_MODEL:-outputs-rm-v1}"
DATA="${DATA:-${HERE}/../demo/rl}"
NPROC="${NPROC:-1}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs-rl-v1}"
DTYPE="${DTYPE:-float32}"
if [ ! -e "${REWARD_MODEL}" ]; then
    echo "run_ppo.sh: reward model ${REWARD_MODEL} not found: train one first (bash ${HERE}/run_rm.sh)" \
        "or set REWARD_MODEL" >&2
    exit 2
fi
if [ "${NPROC}" -gt 1 ]; then
    LAUNCH=(torchrun --nproc_per_node "${NPROC}" -m tunestack)
else
    LAUNCH=(python -m tunestack)
fi

# shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
"${LAUNCH[@]}" rl \
    --model_type auto \
    --model_name_or_path "${MODEL}" \
    --reward_model_name_or_path "${REWARD_MODEL}" \
    --torch_dtype "${DTYPE}" \
    --device_map auto \
    --train_file_dir "${DATA}" \
    --validation_file_dir "${DATA}" \
    --batch_size 8 \
    --max_source_length 256 \
    --max_target_length 256 \
    --max_train_samples 1000 \
    --use_peft True \
    --target_modules q_proj,v_proj \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --do_train \
    --max_steps 100 \
    --learning_rate 1e-5 \
    --save_steps 50 \
    --output_dir "${OUTPUT_DIR}" \
    --early_stopping True \
    --target_kl 0.1 \
    --reward_baseline 0.0 \
    --overwrite_output_dir \
    ${EXTRA_ARGS:-}
