#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct, CPU only, a few minutes:
#   1. continued pretraining (LoRA) on the bundled medical corpus -> perplexity before -> after
#   2. supervised fine-tuning (LoRA) on a self-cognition + general set, starting from step 1's output
#   3. the same questions answered by the base model and by the fine-tuned one
set -euo pipefail
cd "$(dirname "$0")/.."
TS=".venv/bin/tunestack"
OUT=${OUT:-out/demo}
mkdir -p "$OUT"

echo "== 1/3 continued pretraining (PT, LoRA) on examples/data/pretrain"
$TS pt --train_file_dir examples/data/pretrain --do_train --do_eval --validation_split_percentage 10 \
    --block_size 256 --per_device_train_batch_size 4 --max_steps 30 --learning_rate 5e-4 \
    --use_peft True --target_modules all --lora_rank 8 --lora_alpha 16 --logging_steps 5 \
    --save_strategy no --output_dir "$OUT/pt" --overwrite_output_dir

echo "== 2/3 supervised fine-tuning (SFT, LoRA) on examples/demo/sft, from the PT output"
$TS sft --model_name_or_path "$OUT/pt" --train_file_dir examples/demo/sft --do_train \
    --num_train_epochs 3 --per_device_train_batch_size 4 --learning_rate 1e-3 --lr_scheduler_type cosine \
    --warmup_ratio 0.05 --lora_rank 16 --lora_alpha 32 --logging_steps 5 --save_strategy no \
    --output_dir "$OUT/sft" --overwrite_output_dir

echo "== 3/3 before -> after"
for q in "Who are you?" "你是谁？" "What is the capital of France?"; do
    echo "Q: $q"
    echo "  base : $($TS chat --model smollm2-135m-instruct --prompt "$q" --temperature 0 --max_new_tokens 48 2>/dev/null | tr '\n' ' ')"
    echo "  tuned: $($TS chat --model "$OUT/sft" --prompt "$q" --temperature 0 --max_new_tokens 48 2>/dev/null | tr '\n' ' ')"
done
echo "outputs: $OUT/pt and $OUT/sft (run.json, metrics.jsonl, loss.png; tensorboard --logdir $OUT)"
