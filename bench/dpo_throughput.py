"""DPO benchmark: tunestack dpo against TRL's DPOTrainer with its default settings.

Both train the same LoRA (r 8, alpha 16, dropout 0.05, every linear layer) on the real SmolLM2-135M-Instruct
with DPO (sigmoid loss, beta 0.1; the reference is the model with its adapter switched off), on the same
generated preference pairs (the SFT benchmark's chat set: prompt = the conversation before its last answer,
chosen = that answer, rejected = another answer; every pair cut to the cutoff as tunestack cuts it), with
the same learning rate, steps and batch, each in its own subprocess (peak RSS = its VmHWM), alternating:

  (a) trl-dpo        trl.DPOTrainer(DPOConfig(...defaults...), peft_config=LoraConfig(...))
  (b) tunestack-dpo  tunestack dpo ... (skipped, with a message, while `python -m tunestack dpo --help` fails)

    python bench/dpo_throughput.py                        # 20 steps, one round
    python bench/dpo_throughput.py --steps 3              # a quick check

Not a test: numbers depend on the machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (bench/common.py: subprocess runner, chat generator, matmul rate)

SYSTEMS = {
    "a": ("trl-dpo", "TRL DPOTrainer (defaults)"),
    "b": ("tunestack-dpo", "tunestack dpo"),
}
LEARNING_RATE = 5e-6
TRAIN_SEED = 42
BETA = 0.1  # DPOConfig's default and tunestack's


def _lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", bias="none"
    )


def child_trl_dpo(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) TRL's DPOTrainer: DPOConfig defaults but for the settings every system here shares."""
    probe = common.install_probe()
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    with open(spec["data"], encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    config = DPOConfig(
        output_dir=str(Path(spec["work"]) / "out"),
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        learning_rate=LEARNING_RATE,
        seed=TRAIN_SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=spec["dtype"] == "bfloat16",  # DPOConfig's default is True: bf16 autocast, slow on most CPUs
        gradient_checkpointing=spec["trl_gradient_checkpointing"],  # DPOConfig's default is True
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        **spec.get("trainer_args", {}),  # e.g. deepspeed (bench/gpu_check.py)
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
    torch.manual_seed(TRAIN_SEED)
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=_lora_config(),
    )
    trainer.train()
    if spec.get("save"):
        trainer.save_model(str(Path(spec["work"]) / "out"))
    return common.probe_result(probe)


def child_tunestack_dpo(spec: dict[str, Any]) -> dict[str, Any]:
    """(b) tunestack dpo with the same settings."""
    # Import the CLI first, as the `tunestack` command does: it sets process-wide settings (the allocator's)
    # that torch reads when it is first imported.
    from tunestack.cli import main

    probe = common.install_probe()

    argv = [
        "dpo", "--model_name_or_path", spec["model"], "--train_file_dir", str(Path(spec["data"]).parent),
        "--output_dir", str(Path(spec["work"]) / "out"), "--overwrite_output_dir",
        "--max_source_length", str(spec["cutoff"]), "--max_target_length", str(spec["cutoff"]),
        "--per_device_train_batch_size", str(spec["batch_size"]), "--max_steps", str(spec["steps"]),
        "--learning_rate", str(LEARNING_RATE), "--seed", str(TRAIN_SEED), "--beta", str(BETA),
        "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--target_modules", "all",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
        "--torch_dtype", spec["dtype"], *(["--bf16"] if spec["dtype"] == "bfloat16" else []),
    ]  # fmt: skip
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    return common.probe_result(probe)


CHILDREN = {"trl-dpo": child_trl_dpo, "tunestack-dpo": child_tunestack_dpo}


def tunestack_has_dpo() -> str | None:
    """None when `python -m tunestack dpo --help` works, else why not."""
    proc = subprocess.run(
        [sys.executable, "-m", "tunestack", "dpo", "--help"], capture_output=True, text=True, timeout=300
    )
    if proc.returncode == 0:
        return None
    return (proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout) else "no output"


def prepare_data(args: argparse.Namespace, model: str, work: Path) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = common.generate_preference_pairs(args.steps * args.batch_size, args.seed)
    chats = [
        {
            "messages": p["prompt"] + [{"role": "assistant", "content": p["chosen"]}],
            "lang": p["lang"],
            "turns": p["turns"],
        }
        for p in pairs
    ]
    print(f"\nPreference pairs (seed {args.seed}): prompt + chosen, SmolLM2 tokenizer, chat template included:")
    print("  " + common.format_length_report(common.length_report(tokenizer, chats, args.cutoff), args.cutoff))
    records, cut = [], 0
    for p in pairs:
        longer = max(p["chosen"], p["rejected"], key=lambda text: len(tokenizer(text)["input_ids"]))
        fitted, truncated = common.fit_messages(
            tokenizer, p["prompt"] + [{"role": "assistant", "content": longer}], args.cutoff
        )
        cut += truncated
        records.append(
            {
                "prompt": fitted[:-1],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
        )
    print(f"  {cut} of {len(pairs)} prompts cut so that prompt + the longer answer fits {args.cutoff} tokens")
    return str(common.write_jsonl(work / "data" / "pairs.jsonl", records))


def useful_flops(r: dict[str, Any], config: dict[str, Any]) -> float:
    """(6 + 2) x parameters x tokens: policy forward+backward and the reference forward, on chosen and rejected:

    FLOPs = 8 * N_body * T_real + 8 * N_head * T_completion  (see sft_throughput.useful_flops for N_body, N_head)

    T_real counts each pair's prompt twice, as a system that runs chosen and rejected rows apart computes it; one
    that runs the shared prompt once (tunestack) does less work than this, so its fraction can pass 100%.
    """
    n_head = config["vocab_size"] * config["hidden_size"]
    n_body = r["params_total"] - n_head - (0 if config.get("tie_word_embeddings", False) else n_head)
    return 8 * n_body * r["real_tokens"] + 8 * n_head * r["trained_tokens"]


def run_bench(args: argparse.Namespace, model: str, work: Path) -> list[dict[str, Any]]:
    import torch

    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    print(f"DPO throughput: {common.machine_line()}; {common.load_line()}")
    kinds = [SYSTEMS[s][0] for s in args.systems]
    if "tunestack-dpo" in kinds:
        why = tunestack_has_dpo()
        if why:
            print(f"SKIPPED (b) tunestack dpo: `python -m tunestack dpo --help` fails ({why})")
            kinds.remove("tunestack-dpo")
    if not kinds:
        return []
    rate = common.matmul_gflops(dtype)
    print(f"matmul rate ({dtype} torch.mm): best {rate['best']:.1f} GFLOP/s")
    data = prepare_data(args, model, work)
    config = json.loads((Path(model) / "config.json").read_text())
    spec = {
        "model": model,
        "data": data,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "cutoff": args.cutoff,
        "dtype": dtype,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
    }
    order = common.orders(kinds, args.rounds)
    print(
        f"\nTraining: DPO (sigmoid, beta {BETA}), LoRA r 8 / alpha 16 / dropout 0.05 on every linear layer, {dtype}, "
        f"batch {args.batch_size} pairs, {args.steps} steps, lr {LEARNING_RATE}; order {' '.join(order)}"
    )
    rows = []
    for i, kind in enumerate(order):
        r = common.run_child(HERE, kind, spec, work / f"run-{i}-{kind}")
        t = r["train_runtime"]
        r.update(
            s_per_step=t / r["steps"],
            pairs_s=r["steps"] * args.batch_size / t,
            real_tok_s=r["real_tokens"] / t,
            trained_tok_s=r["trained_tokens"] / t,
            peak_fraction=useful_flops(r, config) / t / (rate["best"] * 1e9),
            final_loss=r["losses"][-1],
            rss_mb=r["vmhwm_mb"] or r["peak_rss_mb"],
        )
        rows.append(r)
        print(
            f"  {kind:<14} {r['s_per_step']:6.2f} s/step  {r['pairs_s']:6.2f} pairs/s  total {r['real_tok_s']:7.1f} "
            f"tok/s  answers {r['trained_tok_s']:7.1f} tok/s  VmHWM {r['rss_mb']:6.0f} MB (RSS "
            f"{r['rss_before_train_mb']:.0f} when training starts)  loss {r['losses'][0]:.4f} -> "
            f"{r['final_loss']:.4f}  fwd+bwd median {statistics.median(r['fwd_bwd_s']):.2f} s  "
            f"process {r['wall_s']:.0f} s  load {r['load_before']:.1f}->{r['load_after']:.1f}",
            flush=True,
        )
    by = {k: [r for r in rows if r["kind"] == k] for k in kinds}
    names = {SYSTEMS[s][0]: f"({s}) {SYSTEMS[s][1]}" for s in SYSTEMS}
    print(f"\nMedians; fraction of {rate['best']:.1f} GFLOP/s by FLOPs = 8*N_body*T_real + 8*N_head*T_completion:")
    print(
        f"  {'system':<32}{'s/step':>8}{'pairs/s':>9}{'total tok/s':>13}{'peak RSS MB':>13}{'final loss':>12}{'of peak':>9}"
    )
    for k in kinds:
        m = {key: common.median(by[k], key) for key in ("s_per_step", "pairs_s", "real_tok_s", "rss_mb", "final_loss")}
        m["peak_fraction"] = common.median(by[k], "peak_fraction")
        print(
            f"  {names[k]:<32}{m['s_per_step']:8.2f}{m['pairs_s']:9.2f}{m['real_tok_s']:13.1f}{m['rss_mb']:13.0f}"
            f"{m['final_loss']:12.4f}{m['peak_fraction']:9.1%}"
        )
    if len(kinds) == 2:
        a, b = by["trl-dpo"], by["tunestack-dpo"]
        print(
            f"  ratio tunestack / TRL: pairs/s x{common.median(b, 'pairs_s') / common.median(a, 'pairs_s'):.2f}, "
            f"peak RSS x{common.median(b, 'rss_mb') / common.median(a, 'rss_mb'):.2f}"
        )
    return rows


def main() -> None:
    if common.child_entry(CHILDREN):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per system (order alternates each round)")
    parser.add_argument("--systems", default="ab", help="which of a b to run (default ab)")
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--cutoff", type=int, default=512, help="prompt + answer tokens")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--trl_gradient_checkpointing", action="store_true",
                        help="keep DPOConfig's default gradient checkpointing (off by default, as in tunestack)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1234, help="data generator seed")
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", default=None, help="scratch folder, kept (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    args = parser.parse_args()
    args.systems = [s for s in args.systems.replace(",", "") if s in SYSTEMS] or list(SYSTEMS)

    common.run_in_workdir(args, run_bench, "dpo")


if __name__ == "__main__":
    main()
