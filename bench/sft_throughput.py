"""SFT benchmark: tunestack sft against the plain transformers + PEFT recipe and TRL's SFTTrainer.

Every system trains the same LoRA (r 8, alpha 16, dropout 0.05, every linear layer) on the real
SmolLM2-135M-Instruct, on the same generated chat set (English/Chinese, single/multi-turn, fixed seed,
measured length distribution printed), with the same learning rate, steps, batch (4) and cutoff (512),
each in its own subprocess (peak RSS = that process's VmHWM), in alternating order:

  (a) hf-padded         transformers Trainer + PEFT, the tutorial way: chat template, prompt tokens -100,
                        DataCollatorForSeq2Seq padding to the longest sample
  (b) trl-padding-free  TRL SFTTrainer(SFTConfig(padding_free=True, assistant_only_loss=True))
  (c) tunestack         tunestack sft (padding-free batches + LM head on trained positions: the defaults)
  (d) tunestack-padded  tunestack sft --padding_free false --sparse_lm_head false (ablation)
  (e) tunestack-gc      tunestack sft --gradient_checkpointing true (only with --systems ...e)
  (f) tunestack-mask    tunestack sft --varlen_attention false: packed rows attend through one block-diagonal
                        mask instead of per sample (ablation; only with --systems ...f)
  (g) tunestack-gc2     tunestack sft, gradient checkpointing of every other layer (only with --systems ...g)

All systems train on exactly the same tokens: the assistant answers and their <|im_end|>. The data set
holds steps x batch conversations, so every system sees each of them exactly once whatever its sampler.

    python bench/sft_throughput.py                        # 20 steps, systems a b c d, one round
    python bench/sft_throughput.py --steps 3 --rounds 1   # a quick check

Not a test: numbers depend on the machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (bench/common.py: subprocess runner, chat generator, matmul rate)

SYSTEMS = {
    "a": ("hf-padded", "transformers+PEFT, padded"),
    "b": ("trl-padding-free", "TRL SFTTrainer padding_free"),
    "c": ("tunestack", "tunestack sft"),
    "d": ("tunestack-padded", "tunestack sft, padded ablation"),
    "e": ("tunestack-gc", "tunestack sft + grad. checkpointing"),
    "f": ("tunestack-mask", "tunestack sft, block-mask attention"),
    "g": ("tunestack-gc2", "tunestack sft + checkpointing 1 layer in 2"),
}
LEARNING_RATE = 2e-4
TRAIN_SEED = 42

# SmolLM2-Instruct's own chat template with TRL's {% generation %} markers around what is trained:
# each answer and its <|im_end|> (not the newline after it), exactly the tokens tunestack trains.
# TRL 1.16 cannot patch this template itself (get_training_chat_template knows Qwen, Llama 3 ...).
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------
# Child side: every system trains through a transformers.Trainer subclass, seen by common.install_probe


def _read_messages(path: str) -> list[list[dict[str, str]]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["messages"] for line in fh if line.strip()]


def _lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", bias="none"
    )


def _common_args(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        "output_dir": str(Path(spec["work"]) / "out"),
        "per_device_train_batch_size": spec["batch_size"],
        "max_steps": spec["steps"],
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "linear",
        "seed": TRAIN_SEED,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": spec["dtype"] == "bfloat16",
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_pin_memory": torch.cuda.is_available(),
        **spec.get("trainer_args", {}),  # e.g. deepspeed / fsdp (bench/gpu_check.py)
    }


def child_hf_padded(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) The tutorial recipe: chat template, prompt tokens masked with -100, pad to the longest in the batch."""
    probe = common.install_probe()
    import datasets
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.manual_seed(TRAIN_SEED)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    cutoff = spec["cutoff"]

    def tokenize(example: dict[str, Any]) -> dict[str, list[int]]:
        messages = example["messages"]
        ids = common.chat_ids(tokenizer, messages)
        labels = [-100] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(common.chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
            turn_end = len(common.chat_ids(tokenizer, messages[: i + 1]))
            end = start + ids[start:turn_end].index(tokenizer.eos_token_id) + 1  # the answer and its <|im_end|>
            labels[start:end] = ids[start:end]
        ids, labels = ids[:cutoff], labels[:cutoff]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    raw = datasets.Dataset.from_list([{"messages": m} for m in _read_messages(spec["fitted"])])
    train = raw.map(tokenize, remove_columns=["messages"])
    dtype = getattr(torch, spec["dtype"])
    kwargs: dict[str, Any] = {"attn_implementation": spec["attn"]} if spec.get("attn") else {}
    if spec.get("qlora"):  # the QLoRA tutorial: 4-bit NF4 weights, bf16 compute, k-bit preparation
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, **kwargs)
    model.config.use_cache = False
    if spec.get("qlora"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, _lora_config())
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = Trainer(
        model=model, args=TrainingArguments(**_common_args(spec)), train_dataset=train, data_collator=collator
    )
    trainer.train()
    if spec.get("save"):
        trainer.save_model(str(Path(spec["work"]) / "out"))
    return common.probe_result(probe)


def child_trl_padding_free(spec: dict[str, Any]) -> dict[str, Any]:
    """(b) TRL SFTTrainer, padding-free, loss on the assistant turns of messages data."""
    probe = common.install_probe()
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    messages = _read_messages(spec["fitted"])
    for m in messages[:20]:  # the marked template renders exactly what the model's own template renders
        assert common.chat_ids(tokenizer, m, chat_template=SMOLLM2_TRAINING_TEMPLATE) == common.chat_ids(tokenizer, m)
    template = Path(spec["work"]) / "smollm2_training.jinja"
    template.write_text(SMOLLM2_TRAINING_TEMPLATE, encoding="utf-8")
    config = SFTConfig(
        **_common_args(spec),
        padding_free=True,
        # TRL 1.16 refuses padding_free without packing when max_length is set ("max_length is not enforced"):
        # the conversations come already cut to the cutoff (spec["fitted"], the same cut tunestack makes).
        max_length=None,
        assistant_only_loss=True,
        chat_template_path=str(template),
        gradient_checkpointing=False,  # TRL's default is True; off, like every other system here
    )
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    torch.manual_seed(TRAIN_SEED)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list([{"messages": m} for m in messages]),
        processing_class=tokenizer,
        peft_config=_lora_config(),
    )
    trainer.train()
    return common.probe_result(probe)


def _tunestack(spec: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    # Import the CLI first, as the `tunestack` command does: it sets process-wide settings (the allocator's)
    # that torch reads when it is first imported.
    from tunestack.cli import main

    probe = common.install_probe()

    argv = [
        "sft", "--model_name_or_path", spec["model"], "--train_file_dir", spec["raw_dir"],
        "--output_dir", str(Path(spec["work"]) / "out"), "--overwrite_output_dir",
        "--model_max_length", str(spec["cutoff"]), "--per_device_train_batch_size", str(spec["batch_size"]),
        "--max_steps", str(spec["steps"]), "--learning_rate", str(LEARNING_RATE), "--seed", str(TRAIN_SEED),
        "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--target_modules", "all",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
        "--torch_dtype", spec["dtype"], *(["--bf16"] if spec["dtype"] == "bfloat16" else []), *extra,
    ]  # fmt: skip
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    return common.probe_result(probe)


def child_tunestack(spec: dict[str, Any]) -> dict[str, Any]:
    """(c) tunestack sft with its defaults (padding-free, trained-positions LM head)."""
    return _tunestack(spec, [])


def child_tunestack_padded(spec: dict[str, Any]) -> dict[str, Any]:
    """(d) tunestack sft with both optimisations off."""
    return _tunestack(spec, ["--padding_free", "false", "--sparse_lm_head", "false"])


def child_tunestack_gc(spec: dict[str, Any]) -> dict[str, Any]:
    """(e) tunestack sft with its defaults plus gradient checkpointing (memory for compute; not run by default)."""
    return _tunestack(spec, ["--gradient_checkpointing", "true"])


def child_tunestack_mask(spec: dict[str, Any]) -> dict[str, Any]:
    """(f) tunestack sft with packed rows attending through transformers' block-diagonal mask."""
    return _tunestack(spec, ["--varlen_attention", "false"])


def child_tunestack_gc2(spec: dict[str, Any]) -> dict[str, Any]:
    """(g) tunestack sft recomputing every other decoder layer in the backward pass."""
    return _tunestack(
        spec, ["--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"every_n_layers": 2}']
    )


CHILDREN = {
    "hf-padded": child_hf_padded,
    "trl-padding-free": child_trl_padding_free,
    "tunestack": child_tunestack,
    "tunestack-padded": child_tunestack_padded,
    "tunestack-gc": child_tunestack_gc,
    "tunestack-mask": child_tunestack_mask,
    "tunestack-gc2": child_tunestack_gc2,
}


# ------------------------------------------------------------------------------------------------
# Parent: data, children, report


def prepare_data(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    """The generated pool (distribution printed), and the training set: its first steps x batch conversations,
    written raw (for tunestack, which cuts long samples itself) and cut to the cutoff (for the others)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    pool = common.generate_chats(max(args.pool, args.steps * args.batch_size), args.seed)
    print(f"\nChat set (seed {args.seed}), SmolLM2 tokenizer, chat template included:")
    print("  pool:     " + common.format_length_report(common.length_report(tokenizer, pool, args.cutoff), args.cutoff))
    chats = pool[: args.steps * args.batch_size]
    print(
        "  training: " + common.format_length_report(common.length_report(tokenizer, chats, args.cutoff), args.cutoff)
    )
    raw_dir = work / "data-raw"
    common.write_jsonl(raw_dir / "chat.jsonl", [{"messages": c["messages"]} for c in chats])
    fitted, cut = [], 0
    for c in chats:
        messages, truncated = common.fit_messages(tokenizer, c["messages"], args.cutoff)
        fitted.append({"messages": messages})
        cut += truncated
    fitted_file = common.write_jsonl(work / "data-fitted" / "chat.jsonl", fitted)
    lengths = [len(common.chat_ids(tokenizer, f["messages"])) for f in fitted]
    print(
        f"  cut to {args.cutoff} for (a)/(b) as tunestack cuts it (oldest turns first, then the left of the "
        f"question): {cut} of {len(chats)} cut; {sum(lengths)} tokens in all, longest {max(lengths)}"
    )
    return {"raw_dir": str(raw_dir), "fitted": str(fitted_file)}


def useful_flops(result: dict[str, Any], config: dict[str, Any]) -> float:
    """6 x parameters x tokens, counting each parameter only for the tokens that must pass through it:

        FLOPs = 6 * N_body * T_real + 6 * N_head * T_trained

    N_head = vocab x hidden (the output layer, tied to the embedding in SmolLM2), N_body = every other
    parameter but the embedding (decoder layers, norms, LoRA), T_real = tokens that are not padding,
    T_trained = answer tokens. Padding, and the output layer at untrained positions, are not useful work.
    Attention's own score/value products (~3% here) are left out. With LoRA, backward skips the
    frozen weights' gradients, so the arithmetic really done is nearer 4 N T: the 6 N T convention
    overstates the fraction of peak by up to 1.5x, equally for every system.
    """
    n_body, n_head = param_split(result, config)
    return 6 * n_body * result["real_tokens"] + 6 * n_head * result["trained_tokens"]


def param_split(result: dict[str, Any], config: dict[str, Any]) -> tuple[int, int]:
    """(N_body, N_head) of the trained model: everything but embedding and output layer, and the output layer."""
    n_head = config["vocab_size"] * config["hidden_size"]
    n_embed = 0 if config.get("tie_word_embeddings", False) else n_head
    return result["params_total"] - n_head - n_embed, n_head


def run_bench(args: argparse.Namespace, model: str, work: Path) -> list[dict[str, Any]]:
    import torch

    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    print(f"SFT throughput: {common.machine_line()}; {common.load_line()}")
    rate = common.matmul_gflops(dtype)
    shapes = ", ".join(f"{k} {v:.0f}" for k, v in rate.items() if k != "best")
    print(f"matmul rate ({dtype} torch.mm, GFLOP/s): {shapes}; best {rate['best']:.1f}")
    data = prepare_data(args, model, work)
    config = json.loads((Path(model) / "config.json").read_text())
    spec = {
        "model": model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "cutoff": args.cutoff,
        "dtype": dtype,
        **data,
    }
    kinds = [SYSTEMS[s][0] for s in args.systems]
    print(
        f"\nTraining: LoRA r 8 / alpha 16 / dropout 0.05 on every linear layer of {Path(model).name}, {dtype}, "
        f"batch {args.batch_size}, cutoff {args.cutoff}, {args.steps} steps, lr {LEARNING_RATE}; "
        f"order {' '.join(common.orders(kinds, args.rounds))}"
    )
    rows: list[dict[str, Any]] = []
    for i, kind in enumerate(common.orders(kinds, args.rounds)):
        r = common.run_child(HERE, kind, spec, work / f"run-{i}-{kind}")
        t = r["train_runtime"]
        r.update(
            s_per_step=t / r["steps"],
            trained_tok_s=r["trained_tokens"] / t,
            real_tok_s=r["real_tokens"] / t,
            padded_tok_s=r["padded_tokens"] / t,
            peak_fraction=useful_flops(r, config) / t / (rate["best"] * 1e9),
            final_loss=r["losses"][-1],
            first_loss=r["losses"][0],
            mean_loss=sum(r["losses"]) / len(r["losses"]),
            rss_mb=r["vmhwm_mb"] or r["peak_rss_mb"],
        )
        rows.append(r)
        gpu = f"  GPU peak {r['cuda_peak_mb']:.0f} MB" if r.get("cuda_peak_mb") else ""
        print(
            f"  {kind:<17} {r['s_per_step']:6.2f} s/step  trained {r['trained_tok_s']:7.1f} tok/s  "
            f"total {r['real_tok_s']:7.1f} tok/s  (fed {r['padded_tok_s']:7.1f})  VmHWM {r['rss_mb']:6.0f} MB "
            f"(ru_maxrss {r['peak_rss_mb']:.0f}; RSS {r['rss_before_train_mb']:.0f} when training starts, "
            f"largest step {r['max_step_tokens']} tokens)  loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}  "
            f"fwd+bwd median {statistics.median(r['fwd_bwd_s']):.2f} s  process {r['wall_s']:.0f} s "
            f"(CPU {r['cpu_s']:.0f} s)  load {r['load_before']:.1f}->{r['load_after']:.1f}{gpu}",
            flush=True,
        )
    report(rows, kinds, rate["best"], dtype, param_split(rows[0], config))
    return rows


def report(rows: list[dict[str, Any]], kinds: list[str], gflops: float, dtype: str, params: tuple[int, int]) -> None:
    by = {k: [r for r in rows if r["kind"] == k] for k in kinds}
    med = {
        k: {key: common.median(v, key) for key in v[0] if isinstance(v[0][key], (int, float))} for k, v in by.items()
    }
    names = {SYSTEMS[s][0]: f"({s}) {SYSTEMS[s][1]}" for s in SYSTEMS}
    print(f"\nMedians over rounds; fraction of the measured {dtype} matmul rate ({gflops:.1f} GFLOP/s) by")
    print(
        f"FLOPs = 6*N_body*T_real + 6*N_head*T_trained (N_body {params[0] / 1e6:.1f}M incl. LoRA, "
        f"N_head {params[1] / 1e6:.1f}M; T_real = non-padding tokens, T_trained = answer tokens):"
    )
    header = (
        f"  {'system':<40}{'s/step':>8}{'trained tok/s':>15}{'total tok/s':>13}{'peak RSS MB':>13}"
        f"{'final loss':>12}{'of peak':>9}"
    )
    print(header)
    for k in kinds:
        m = med[k]
        print(
            f"  {names[k]:<40}{m['s_per_step']:8.2f}{m['trained_tok_s']:15.1f}{m['real_tok_s']:13.1f}"
            f"{m['rss_mb']:13.0f}{m['final_loss']:12.3f}{m['peak_fraction']:9.1%}"
        )
    tokens = {k: (by[k][0]["trained_tokens"], by[k][0]["real_tokens"], by[k][0]["padded_tokens"]) for k in kinds}
    print(
        "  tokens per run (trained / real / fed to the model): "
        + "; ".join(f"{k} {t[0]}/{t[1]}/{t[2]}" for k, t in tokens.items())
    )
    print(
        "  first-step loss (same batch, LoRA B = 0, so the base model's loss): "
        + ", ".join(f"{k} {med[k]['first_loss']:.4f}" for k in kinds)
    )
    for base in ("hf-padded", "trl-padding-free"):
        if base not in med:
            continue
        ratios = ", ".join(
            f"{k} x{med[k]['trained_tok_s'] / med[base]['trained_tok_s']:.2f} speed / x{med[k]['rss_mb'] / med[base]['rss_mb']:.2f} RSS"
            for k in kinds
            if k != base
        )
        print(f"  vs {names[base]}: {ratios}")
    if "tunestack" in med:
        ts = med["tunestack"]
        checks = []
        if "hf-padded" in med:
            a = med["hf-padded"]
            checks.append(("trained tok/s >= 2x (a)", ts["trained_tok_s"] / a["trained_tok_s"], 2.0, True))
            checks.append(("peak RSS <= 1/2 of (a)", ts["rss_mb"] / a["rss_mb"], 0.5, False))
        if "trl-padding-free" in med:
            b = med["trl-padding-free"]
            checks.append(("trained tok/s >= 1.5x (b)", ts["trained_tok_s"] / b["trained_tok_s"], 1.5, True))
        for what, value, target, at_least in checks:
            ok = value >= target if at_least else value <= target
            print(f"  target {what}: x{value:.2f} -> {'met' if ok else 'MISSED'}")


def main() -> None:
    if common.child_entry(CHILDREN):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per system (order alternates each round)")
    parser.add_argument("--systems", default="abcd", help="which of a b c d e f g to run, e.g. abc (default abcd)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bfloat16 on a GPU, float32 on a CPU (CPU bf16 autocast is slow)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1234, help="chat generator seed")
    parser.add_argument("--pool", type=int, default=2000, help="conversations generated to show the distribution")
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", default=None, help="scratch folder, kept (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    args = parser.parse_args()
    args.systems = [s for s in args.systems.replace(",", "") if s in SYSTEMS] or list(SYSTEMS)

    common.run_in_workdir(args, run_bench, "sft")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
