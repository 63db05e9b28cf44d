"""Short real jobs on the GPUs of this machine, each beside a plain Trainer+PEFT run of the same job.

    python bench/gpu_check.py                 # every job (bench/gpu_check.sh installs what they need first)
    python bench/gpu_check.py --jobs sft_sdpa,zero3 --steps 30
    python bench/gpu_check.py --list          # the jobs this machine would run, and why any is left out
    python bench/gpu_check.py --cpu           # a dry run of the harness on a CPU: a tiny random model, 2 steps

Jobs (SmolLM2-135M-Instruct, LoRA r 8 on every linear layer, batch 8, 512-token cutoff, bf16):
  sft_sdpa  tunestack sft, SDPA                     vs  Trainer + PEFT, padded batches, SDPA
  sft_fa2   the same with flash-attention 2 (only where the flash_attn package imports)
  qlora     tunestack sft --load_in_4bit (QLoRA)    vs  Trainer + PEFT on a bitsandbytes NF4 model
  zero2     torchrun (one process per GPU) --deepspeed zero2      vs  Trainer + PEFT with the same config
  zero3     the same with zero3 (the adapter is gathered for the save)
  fsdp      --fsdp "full_shard auto_wrap"           vs  Trainer + PEFT with the same FSDP settings
  dpo       tunestack dpo                           vs  TRL DPOTrainer + PEFT
  ppo       tunestack rl --algo ppo (no plain counterpart: TRL 1.x has no PPOTrainer)

Every job prints trained tokens/s (tokens the model was given per second of `Trainer.train`) and the peak GPU
memory of rank 0 (torch.cuda.max_memory_allocated), beside the plain run and their ratio. The check exits 1
when any run fails or any saved adapter is empty or untrained (tunestack.checkpoints.verify_saved_model reads
the file back), 2 when there is no GPU (without --cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (bench/common.py: probe, chat generator)

MODEL = "smollm2-135m-instruct"
JOB_NAMES = ("sft_sdpa", "sft_fa2", "qlora", "zero2", "zero3", "fsdp", "dpo", "ppo")
LORA = ["--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--target_modules", "all"]
RUN_TIMEOUT_S = 240  # one run; the whole check must stay within 10 minutes on one H100-class GPU


def jobs(gpus: int, flash_attn: bool, cpu: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """The jobs to run on this machine, and a line for each one left out."""
    procs = max(1, gpus) if not cpu else 1
    left_out = []
    table = [
        {"name": "sft_sdpa", "stage": "sft", "extra": ["--attn_implementation", "sdpa"], "plain": "hf", "attn": "sdpa"},
        {"name": "sft_fa2", "stage": "sft", "extra": ["--attn_implementation", "flash_attention_2"], "plain": "hf",
         "attn": "flash_attention_2"},
        {"name": "qlora", "stage": "sft", "extra": ["--load_in_4bit", "true"], "plain": "hf", "qlora": True},
        {"name": "zero2", "stage": "sft", "extra": ["--deepspeed", "zero2"], "plain": "hf", "procs": procs,
         "trainer_args": {"deepspeed": "zero2"}},
        {"name": "zero3", "stage": "sft", "extra": ["--deepspeed", "zero3"], "plain": "hf", "procs": procs,
         "trainer_args": {"deepspeed": "zero3"}},
        {"name": "fsdp", "stage": "sft", "extra": ["--fsdp", "full_shard auto_wrap"], "plain": "hf", "procs": procs,
         "trainer_args": {"fsdp": True, "fsdp_config": {"reshard_after_forward": True}}},
        {"name": "dpo", "stage": "dpo", "extra": [], "plain": "trl_dpo"},
        {"name": "ppo", "stage": "rl", "extra": [], "plain": None},
    ]  # fmt: skip
    kept = []
    for job in table:
        if job["name"] == "sft_fa2" and (cpu or not flash_attn):
            left_out.append("sft_fa2: flash_attn does not import here (bench/gpu_check.sh installs a wheel if one fits)")
        elif job["name"] == "qlora" and cpu:
            left_out.append("qlora: 4-bit bitsandbytes kernels are a GPU job")
        else:
            kept.append(job)
    return kept, left_out


def _shipped(name: str) -> str:
    from tunestack.config.deepspeed import resolve_deepspeed

    return str(resolve_deepspeed(name))


def tunestack_argv(job: dict[str, Any], data: dict[str, str], out: Path, steps: int, dtype: str) -> list[str]:
    head = ["--model_name_or_path", data["model"], "--output_dir", str(out), "--overwrite_output_dir", "true",
            "--max_steps", str(steps), "--seed", "42", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", "5", "--torch_dtype", dtype, *(["--bf16", "true"] if dtype == "bfloat16" else []),
            *LORA]  # fmt: skip
    if job["stage"] == "sft":
        body = ["--train_file_dir", data["chat_dir"], "--model_max_length", "512", "--per_device_train_batch_size", "8",
                "--learning_rate", "2e-4"]  # fmt: skip
    elif job["stage"] == "dpo":
        body = ["--train_file_dir", data["pairs_dir"], "--max_source_length", "256", "--max_target_length", "256",
                "--per_device_train_batch_size", "4", "--learning_rate", "5e-6"]  # fmt: skip
    else:
        body = ["--algo", "ppo", "--train_file_dir", data["prompts_dir"], "--reward_funcs", data["reward"],
                "--batch_size", "8", "--mini_batch_size", "4", "--ppo_epochs", "2", "--max_target_length", "48",
                "--learning_rate", "1e-5"]  # fmt: skip
    return [job["stage"], *head, *body, *job["extra"]]


def plain_spec(job: dict[str, Any], data: dict[str, str], work: Path, steps: int, dtype: str) -> dict[str, Any]:
    trainer_args = dict(job.get("trainer_args") or {})
    if "deepspeed" in trainer_args:
        trainer_args["deepspeed"] = _shipped(trainer_args["deepspeed"])
    return {
        "model": data["model"], "work": str(work), "steps": steps, "dtype": dtype, "cutoff": 512, "save": True,
        "batch_size": 8 if job["stage"] == "sft" else 4, "fitted": data["fitted"], "data": data["pairs_file"],
        "trl_gradient_checkpointing": False, "attn": job.get("attn"), "qlora": job.get("qlora", False),
        "trainer_args": trainer_args,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ children


def _peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def child_tunestack(spec: dict[str, Any]) -> dict[str, Any]:
    from tunestack.cli import main  # first, as the command does (process-wide allocator settings)

    probe = common.install_probe() if spec["argv"][0] != "rl" else None
    started = time.perf_counter()
    try:
        main(spec["argv"])
    except SystemExit as exc:
        if exc.code:
            raise
    if probe is not None:
        result = common.probe_result(probe)
        return {"tokens_per_s": result["padded_tokens"] / result["train_runtime"], "peak_mb": _peak_mb()}
    rows = [json.loads(line) for line in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(r["response_length"] * spec["ppo_batch"] for r in rows if "response_length" in r and r["step"])
    return {"tokens_per_s": tokens / (time.perf_counter() - started), "peak_mb": _peak_mb(), "unit": "generated"}


def child_plain(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["plain"] == "trl_dpo":
        import dpo_throughput as bench
    else:
        import sft_throughput as bench
    result = (bench.child_trl_dpo if spec["plain"] == "trl_dpo" else bench.child_hf_padded)(spec)
    return {"tokens_per_s": result["padded_tokens"] / result["train_runtime"], "peak_mb": _peak_mb()}


CHILDREN = {"tunestack": child_tunestack, "plain": child_plain}


def _child_main(kind: str, spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result = CHILDREN[kind](spec)
    rank = int(os.environ.get("RANK", "0"))
    Path(spec_file).with_name(f"result-{kind}-rank{rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ the check


def run(kind: str, spec: dict[str, Any], procs: int, work: Path) -> dict[str, Any]:
    """One run in its own process(es); {ok, tokens_per_s, peak_mb, error}."""
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / f"spec-{kind}.json"
    spec_file.write_text(json.dumps(spec))
    launch = [sys.executable]
    if procs > 1 or spec.get("distributed"):
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = [*launch, str(HERE), "_child", kind, str(spec_file)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=work)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"took longer than {RUN_TIMEOUT_S}s"}
    result_file = spec_file.with_name(f"result-{kind}-rank0.json")
    if proc.returncode != 0 or not result_file.is_file():
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        (work / f"{kind}.log").write_text(proc.stdout + proc.stderr)
        return {"ok": False, "error": last[0][:200], "log": str(work / f"{kind}.log")}
    return {"ok": True, **json.loads(result_file.read_text())}


def adapter_problem(folder: Path) -> str | None:
    """Why the adapter saved in `folder` is no good (missing, empty placeholders, untrained), or None."""
    from tunestack.checkpoints import SaveCheckError, verify_saved_model

    try:
        verify_saved_model(folder, trained=True)
    except SaveCheckError as exc:
        return str(exc)
    return None


def check(rows: list[dict[str, Any]]) -> int:
    """0 when every run finished and saved a trained adapter, else 1."""
    return 0 if all(r["ok"] and not r.get("adapter_problem") for r in rows) else 1


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """One line per job: tunestack beside the plain run, with their ratios."""
    lines = [f"{'job':<9} {'system':<10} {'tokens/s':>10} {'peak GPU MB':>12} {'x plain':>8}  result"]
    by_job: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_job.setdefault(r["job"], {})[r["system"]] = r
    for job, systems in by_job.items():
        plain = systems.get("plain")
        for name in ("tunestack", "plain"):
            r = systems.get(name)
            if r is None:
                continue
            ratio = None
            if name == "tunestack" and plain and plain["ok"] and r["ok"] and plain.get("tokens_per_s"):
                ratio = r["tokens_per_s"] / plain["tokens_per_s"]
            status = "ok" if r["ok"] and not r.get("adapter_problem") else (r.get("error") or r.get("adapter_problem"))
            lines.append(
                f"{job:<9} {name:<10} {_fmt(r.get('tokens_per_s'), ',.0f'):>10} {_fmt(r.get('peak_mb'), ',.0f'):>12} "
                f"{_fmt(ratio, '.2f'):>8}  {status}"
            )
    return "\n".join(lines)


def prepare(work: Path, cpu: bool) -> dict[str, str]:
    """The model and the generated data every job reads."""
    from tunestack.model.builtin import builtin_model_dir

    model = Path(builtin_model_dir(MODEL))
    if cpu:  # a tiny random model with SmolLM2's tokenizer: the harness, not the numbers
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(model)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        model = work / "tiny-model"
        LlamaForCausalLM(config).save_pretrained(model)
        tok.save_pretrained(model)
    chats = common.generate_chats(96, seed=0)
    chat_dir = work / "chat"
    common.write_jsonl(chat_dir / "chat.jsonl", [{"messages": c["messages"]} for c in chats])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    fitted = [{"messages": common.fit_messages(tokenizer, c["messages"], 512)[0]} for c in chats]
    fitted_file = common.write_jsonl(work / "chat-fitted" / "chat.jsonl", fitted)
    pairs_file = common.write_jsonl(work / "pairs" / "pairs.jsonl", common.generate_preference_pairs(64, seed=0))
    prompts_dir = work / "prompts"
    prompts_dir.mkdir(parents=True, exist_ok=True)
    questions = [c["messages"][0]["content"][:200] for c in chats if c["messages"][0]["role"] == "user"]
    (prompts_dir / "prompts.txt").write_text("\n".join(q.replace("\n", " ") for q in questions) + "\n")
    reward = work / "brevity_reward.py"  # PPO's reward: shorter answers score higher
    reward.write_text("def brevity(prompts, completions, **_):\n    return [-len(c) / 100 for c in completions]\n")
    return {"model": str(model), "chat_dir": str(chat_dir), "fitted": str(fitted_file),
            "pairs_dir": str(pairs_file.parent), "pairs_file": str(pairs_file), "prompts_dir": str(prompts_dir),
            "reward": f"{reward}:brevity"}  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="dry run of the harness on a CPU (tiny model, 2 steps)")
    parser.add_argument("--jobs", help=f"comma-separated subset of {', '.join(JOB_NAMES)}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; 2 with --cpu)")
    parser.add_argument("--list", action="store_true", help="print the jobs this machine would run and stop")
    parser.add_argument("--workdir", help="keep the runs' folders here (default: a temporary folder)")
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    if not gpus and not args.cpu:
        print("gpu_check: no NVIDIA GPU is visible (torch.cuda.device_count() == 0); --cpu runs a dry run")  # noqa: T201
        sys.exit(2)
    try:
        import flash_attn  # noqa: F401

        flash = True
    except ImportError:
        flash = False
    selected, left_out = jobs(gpus, flash, args.cpu)
    if args.jobs:
        wanted = [j.strip() for j in args.jobs.split(",") if j.strip()]
        unknown = [j for j in wanted if j not in JOB_NAMES]
        if unknown:
            parser.error(f"unknown job {unknown[0]}; jobs: {', '.join(JOB_NAMES)}")
        selected = [j for j in selected if j["name"] in wanted]
    steps, dtype = args.steps or (2 if args.cpu else 30), "float32" if args.cpu else "bfloat16"
    device = "CPU dry run (tiny random model)" if args.cpu else f"{gpus} x {torch.cuda.get_device_name(0)}"
    print(f"gpu_check on {device}: {', '.join(j['name'] for j in selected)}, {steps} steps each")  # noqa: T201
    for line in left_out:
        print(f"  left out: {line}")  # noqa: T201
    if args.list:
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    data, rows, started = prepare(work, args.cpu), [], time.time()
    for job in selected:
        procs = job.get("procs", 1)
        runs = [("tunestack", {"argv": tunestack_argv(job, data, work / job["name"] / "tunestack" / "out", steps,
                                                      dtype), "out": str(work / job["name"] / "tunestack" / "out"),
                               "ppo_batch": 8 * procs, "distributed": "procs" in job})]  # fmt: skip
        if job["plain"]:
            runs.append(("plain", {**plain_spec(job, data, work / job["name"] / "plain", steps, dtype),
                                   "plain": job["plain"], "distributed": "procs" in job}))  # fmt: skip
        for system, spec in runs:
            result = {"job": job["name"], "system": system, **run(system, spec, procs, work / job["name"] / system)}
            out = work / job["name"] / system / "out"
            if result["ok"]:
                result["adapter_problem"] = adapter_problem(out)
            rows.append(result)
            print(f"  {job['name']:<9} {system:<10} {'ok' if result['ok'] else 'FAILED'}", flush=True)  # noqa: T201
    print(table(rows))  # noqa: T201
    print(f"gpu_check: {len(rows)} runs in {time.time() - started:.0f}s; folders in {work}")  # noqa: T201
    sys.exit(check(rows))


if __name__ == "__main__":
    main()
