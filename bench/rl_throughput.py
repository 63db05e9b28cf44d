"""RL benchmark: tunestack's GRPO and RLOO against TRL's trainers, and tunestack's PPO, on SmolLM2 + LoRA.

Every system trains the same LoRA (r 8, alpha 16, every linear layer; dropout off, tunestack's default and set
in TRL's config too) on the real SmolLM2-135M-Instruct, on the same prompts (examples/demo/rl, rendered with the
model's chat template), with the same rule reward (`rule_reward` below), 4 completions of at most 64 tokens per
prompt, 10 steps, seed 42, each in its own subprocess (peak RSS = its VmHWM), in alternating order:

  (a) trl-grpo        trl.GRPOTrainer(GRPOConfig(...), peft_config=LoraConfig(...)), its defaults but the shared settings
  (b) tunestack-grpo  tunestack rl --algo grpo
  (c) trl-rloo        trl.RLOOTrainer, the same way
  (d) tunestack-rloo  tunestack rl --algo rloo
  (e) tunestack-ppo   tunestack rl --algo ppo against a reward model (trained here first) plus the rule
  (f) ppo-padded      the same with --padding_free false --packed_sampling false --old_logprobs_from_sampling false:
                      PPO as it was before its packed scoring passes, packed sampling and old-policy scores read off
                      the sampling passes (padded rows, rollouts on nn.Linear, a pass for the old scores)
  (g) ppo-before      tunestack rl --algo ppo from an earlier source tree (--baseline_src): the code itself, with
                      whatever else differed then (e.g. `git worktree add /tmp/ppo-before b13a4f3`, PPO as it was
                      when its speed-up was asked for; it sampled with SmolLM2's top_k 50 / top_p 0.9, a bug fixed
                      since, so its samples, and with them the step-1 reward, differ from e's)

    python bench/rl_throughput.py                      # 10 steps, a b c d e, one round
    python bench/rl_throughput.py --systems ef         # PPO packed against padded
    python bench/rl_throughput.py --systems eg --baseline_src /tmp/ppo-before   # PPO against an earlier tunestack
    python bench/rl_throughput.py --steps 2 --systems ab   # a quick check

Not a test: numbers depend on the machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (bench/common.py: subprocess runner, matmul rate)

SYSTEMS = {
    "a": ("trl-grpo", "TRL GRPOTrainer"),
    "b": ("tunestack-grpo", "tunestack rl --algo grpo"),
    "c": ("trl-rloo", "TRL RLOOTrainer"),
    "d": ("tunestack-rloo", "tunestack rl --algo rloo"),
    "e": ("tunestack-ppo", "tunestack rl --algo ppo"),
    "f": ("ppo-padded", "tunestack rl --algo ppo, as before (padded, plain sampling)"),
    "g": ("ppo-before", "tunestack rl --algo ppo of --baseline_src"),
}
# (baseline, ours, the speed-up targeted)
PAIRS = (
    ("trl-grpo", "tunestack-grpo", 1.5),
    ("trl-rloo", "tunestack-rloo", 1.5),
    ("ppo-padded", "tunestack-ppo", 1.4),
    ("ppo-before", "tunestack-ppo", 1.4),
)
PPO_KINDS = ("tunestack-ppo", "ppo-padded", "ppo-before")
LEARNING_RATE = 1e-5
BETA = 0.2  # tunestack's --init_kl_coef default; TRL's GRPO default is 0 (no reference pass), RLOO's 0.05
TRAIN_SEED = 42
PROMPTS = ROOT / "examples" / "demo" / "rl" / "prompts.jsonl"
RM_DATA = ROOT / "examples" / "demo" / "dpo" / "train"
PPO_PHASES = ("generation", "reward", "old_logprobs_values", "ref_logprobs", "update")


def rule_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """About twenty words is best: minus the distance from twenty words, in tens."""
    return [-abs(len(c.split()) - 20) / 10.0 for c in completions]


# ------------------------------------------------------------------------------------------------
# Child side


def rl_probe() -> dict[str, Any]:
    """Record what every transformers.Trainer (TRL's, tunestack's) did: train_runtime, its log history, the seconds
    of each step and, within them, of generation (TRL's `_generate`) and of the whole generate-and-score stage
    (generation, reward, reference and old-policy log-probs). Call before the trainer is built."""
    from transformers import Trainer
    from trl import GRPOTrainer, RLOOTrainer

    probe: dict[str, Any] = {"step_s": [], "generate_s": [], "score_s": []}
    training_step, train = Trainer.training_step, Trainer.train

    def timed(name: str, fn: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                probe[name].append(time.perf_counter() - start)

        return wrapper

    for cls in (GRPOTrainer, RLOOTrainer):
        cls._generate = timed("generate_s", cls._generate)
        cls._generate_and_score_completions = timed("score_s", cls._generate_and_score_completions)
    Trainer.training_step = timed("step_s", training_step)

    def probed_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        probe["rss_before_train_mb"] = common.vmrss_mb()
        out = train(self, *args, **kwargs)
        probe["train_runtime"] = out.metrics["train_runtime"]
        probe["log_history"] = [dict(h) for h in self.state.log_history]
        probe["completions_per_step"] = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return out

    Trainer.train = probed_train
    return probe


def trainer_result(probe: dict[str, Any]) -> dict[str, Any]:
    rows = [h for h in probe.get("log_history", []) if "reward" in h]
    if not rows:
        raise RuntimeError("the probe saw no logged training step")
    per_step = probe["completions_per_step"]
    return {
        "train_s": probe["train_runtime"],
        "steps": len(rows),
        "generated_tokens": sum(h["completions/mean_length"] * per_step for h in rows),
        "reward_1": rows[0]["reward"],
        "loss_1": rows[0]["loss"],
        "rewards": [h["reward"] for h in rows],
        "losses": [h["loss"] for h in rows],
        "step_s": probe["step_s"],
        "generate_s": probe["generate_s"],
        "score_s": [s - g for s, g in zip(probe["score_s"], probe["generate_s"], strict=False)],
        "rss_before_train_mb": probe["rss_before_train_mb"],
    }


def _lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", bias="none"
    )


def _trl(spec: dict[str, Any], algo: str) -> dict[str, Any]:
    probe = rl_probe()
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as RLTrainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as RLTrainer
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    config = Config(
        output_dir=str(Path(spec["work"]) / "out"),
        per_device_train_batch_size=spec["generations"] * spec["prompts_per_step"],
        num_generations=spec["generations"],
        max_completion_length=spec["completion_length"],
        max_steps=spec["steps"],
        learning_rate=LEARNING_RATE,
        beta=BETA,
        seed=TRAIN_SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_dropout=True,  # TRL's default is False; tunestack's True
        bf16=spec["dtype"] == "bfloat16",  # TRL's default is True: bf16 autocast, slow on most CPUs
        gradient_checkpointing=spec["trl_gradient_checkpointing"],  # TRL's default is True; tunestack's False
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
    trainer = RLTrainer(
        model=model,
        reward_funcs=[rule_reward],
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": spec["rendered"]}),
        processing_class=tokenizer,
        peft_config=_lora_config(),
    )
    trainer.train()
    return trainer_result(probe)


def child_trl_grpo(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) TRL's GRPOTrainer."""
    return _trl(spec, "grpo")


def child_trl_rloo(spec: dict[str, Any]) -> dict[str, Any]:
    """(c) TRL's RLOOTrainer."""
    return _trl(spec, "rloo")


def _tunestack_argv(spec: dict[str, Any], algo: str) -> list[str]:
    return [
        "rl", "--algo", algo, "--model_name_or_path", spec["model"], "--train_file_dir", spec["prompts"],
        "--output_dir", str(Path(spec["work"]) / "out"), "--overwrite_output_dir",
        "--reward_funcs", f"{HERE}:rule_reward", "--max_target_length", str(spec["completion_length"]),
        "--max_steps", str(spec["steps"]), "--learning_rate", str(LEARNING_RATE), "--init_kl_coef", str(BETA),
        "--seed", str(TRAIN_SEED), "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
        "--target_modules", "all", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--torch_dtype", spec["dtype"], *(["--bf16"] if spec["dtype"] == "bfloat16" else []),
    ]  # fmt: skip


def _run_cli(argv: list[str]) -> None:
    from tunestack.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise


def _tunestack_trl(spec: dict[str, Any], algo: str) -> dict[str, Any]:
    # Import the CLI first, as the `tunestack` command does: it sets process-wide settings (the allocator's)
    # that torch reads when it is first imported.
    import tunestack.cli  # noqa: F401

    probe = rl_probe()
    per_step = str(spec["generations"] * spec["prompts_per_step"])
    extra = ["--num_generations", str(spec["generations"]), "--per_device_train_batch_size", per_step]
    _run_cli([*_tunestack_argv(spec, algo), *extra])
    return trainer_result(probe)


def child_tunestack_grpo(spec: dict[str, Any]) -> dict[str, Any]:
    """(b) tunestack rl --algo grpo."""
    return _tunestack_trl(spec, "grpo")


def child_tunestack_rloo(spec: dict[str, Any]) -> dict[str, Any]:
    """(d) tunestack rl --algo rloo."""
    return _tunestack_trl(spec, "rloo")


def _tunestack_ppo(spec: dict[str, Any], *extra: str, src: str | None = None) -> dict[str, Any]:
    """tunestack rl --algo ppo (of the source tree `src` if given): one completion per prompt, batch = the other
    systems' completions per step."""
    if src is not None:
        sys.path.insert(0, str(Path(src) / "src"))
    import tunestack.cli  # (see _tunestack_trl)

    if src is not None and not Path(tunestack.cli.__file__).is_relative_to(Path(src).resolve()):
        raise RuntimeError(f"tunestack was imported from {tunestack.cli.__file__}, not from {src}")

    rss_start = common.vmrss_mb()
    batch = spec["generations"] * spec["prompts_per_step"]
    argv = [
        *_tunestack_argv(spec, "ppo"), "--reward_model", spec["reward_model"], "--batch_size", str(batch),
        "--mini_batch_size", str(spec["ppo_mini_batch"]), "--ppo_epochs", str(spec["ppo_epochs"]), *extra,
    ]  # fmt: skip
    _run_cli(argv)
    rows = [json.loads(line) for line in (Path(spec["work"]) / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward_mean" in r]
    if not rows or "time/step" not in rows[0]:
        raise RuntimeError("the PPO run logged no step times (time/step in metrics.jsonl)")
    return {
        "train_s": sum(r["time/step"] for r in rows),
        "steps": len(rows),
        "generated_tokens": sum(r["response_length"] * batch for r in rows),
        "reward_1": rows[0]["reward_mean"],
        "loss_1": rows[0]["policy_loss"],
        "rewards": [r["reward_mean"] for r in rows],
        "losses": [r["policy_loss"] for r in rows],
        "step_s": [r["time/step"] for r in rows],
        "phases": {p: [r.get(f"time/{p}", 0.0) for r in rows] for p in PPO_PHASES},
        "rss_before_train_mb": rss_start,
    }


def child_tunestack_ppo(spec: dict[str, Any]) -> dict[str, Any]:
    return _tunestack_ppo(spec)


def child_ppo_padded(spec: dict[str, Any]) -> dict[str, Any]:
    return _tunestack_ppo(
        spec, "--padding_free", "false", "--packed_sampling", "false", "--old_logprobs_from_sampling", "false"
    )


def child_ppo_before(spec: dict[str, Any]) -> dict[str, Any]:
    return _tunestack_ppo(spec, src=spec["baseline_src"])


CHILDREN = {
    "trl-grpo": child_trl_grpo,
    "tunestack-grpo": child_tunestack_grpo,
    "trl-rloo": child_trl_rloo,
    "tunestack-rloo": child_tunestack_rloo,
    "tunestack-ppo": child_tunestack_ppo,
    "ppo-padded": child_ppo_padded,
    "ppo-before": child_ppo_before,
}


# ------------------------------------------------------------------------------------------------
# Parent


def prepare_prompts(model: str, work: Path) -> dict[str, Any]:
    """The prompt file tunestack reads and the same prompts rendered with the chat template for TRL, checked to be
    the text tunestack renders."""
    from transformers import AutoTokenizer

    from tunestack.data.prompts import PromptEncoder, load_prompts
    from tunestack.data.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(model)
    folder = work / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROMPTS, folder / "prompts.jsonl")
    questions = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    encode = PromptEncoder(tokenizer, get_template(None, tokenizer), 256)
    ours = [tokenizer.decode(encode(p), skip_special_tokens=False) for p in load_prompts(str(folder))]
    if ours != rendered:
        raise SystemExit("tunestack renders the prompts differently from the chat template: not the same work")
    lengths = [len(tokenizer(t)["input_ids"]) for t in rendered]
    print(f"prompts: {len(rendered)} from {PROMPTS.relative_to(ROOT)}, {min(lengths)}-{max(lengths)} tokens rendered")
    return {"prompts": str(folder), "rendered": rendered}


def prepare_reward_model(model: str, work: Path, dtype: str) -> str:
    """A small LoRA reward model for PPO (4 steps on the demo's preference pairs); kept in --workdir."""
    out = work / "rm"
    run = out / "run.json"
    if run.is_file() and json.loads(run.read_text()).get("status") == "complete":
        return str(out)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable, "-m", "tunestack", "rm", "--model_name_or_path", model, "--train_file_dir", str(RM_DATA),
            "--output_dir", str(out), "--overwrite_output_dir", "--max_steps", "4", "--per_device_train_batch_size",
            "4", "--learning_rate", "1e-3", "--lora_rank", "8", "--lora_alpha", "16", "--target_modules", "all",
            "--save_strategy", "no", "--report_to", "none", "--torch_dtype", dtype,
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    print(f"reward model for PPO: {out} (4 LoRA steps, {time.perf_counter() - start:.0f} s)")
    return str(out)


def run_bench(args: argparse.Namespace, model: str, work: Path) -> list[dict[str, Any]]:
    import torch

    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    print(f"RL throughput: {common.machine_line()}; {common.load_line()}")
    rate = common.matmul_gflops(dtype)
    print(f"matmul rate ({dtype} torch.mm): best {rate['best']:.1f} GFLOP/s")
    kinds = [SYSTEMS[s][0] for s in args.systems]
    spec: dict[str, Any] = {
        "model": model,
        "steps": args.steps,
        "generations": args.generations,
        "prompts_per_step": args.prompts_per_step,
        "completion_length": args.completion_length,
        "ppo_mini_batch": args.ppo_mini_batch,
        "ppo_epochs": args.ppo_epochs,
        "dtype": dtype,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
        "baseline_src": args.baseline_src,
        **prepare_prompts(model, work),
    }
    if any(k in kinds for k in PPO_KINDS):
        spec["reward_model"] = prepare_reward_model(model, work, dtype)
    order = common.orders(kinds, args.rounds)
    print(
        f"\nLoRA r 8 / alpha 16 on every linear layer, {dtype}; {args.prompts_per_step} prompts x {args.generations} "
        f"completions of <= {args.completion_length} tokens per step ({args.generations * args.prompts_per_step} "
        f"prompts per PPO step, minibatch {args.ppo_mini_batch}, {args.ppo_epochs} epochs), {args.steps} steps, "
        f"lr {LEARNING_RATE}, KL coefficient {BETA}; order {' '.join(order)}"
    )
    rows = []
    for i, kind in enumerate(order):
        r = common.run_child(HERE, kind, spec, work / f"run-{i}-{kind}")
        r.update(
            s_per_step=r["train_s"] / r["steps"],
            gen_tok_s=r["generated_tokens"] / r["train_s"],
            rss_mb=r["vmhwm_mb"] or r["peak_rss_mb"],
        )
        rows.append(r)
        print(
            f"  {kind:<15} {r['s_per_step']:6.2f} s/step  generated {r['gen_tok_s']:6.1f} tok/s  VmHWM "
            f"{r['rss_mb']:6.0f} MB (RSS {r['rss_before_train_mb']:.0f} before training)  step 1: reward "
            f"{r['reward_1']:.4f} loss {r['loss_1']:.6f}  process {r['wall_s']:.0f} s  "
            f"load {r['load_before']:.1f}->{r['load_after']:.1f}",
            flush=True,
        )
    report(rows, kinds)
    return rows


def report(rows: list[dict[str, Any]], kinds: list[str]) -> None:
    by = {k: [r for r in rows if r["kind"] == k] for k in kinds}
    names = {SYSTEMS[s][0]: f"({s}) {SYSTEMS[s][1]}" for s in SYSTEMS}
    print("\nMedians over rounds:")
    print(
        f"  {'system':<32}{'s/step':>8}{'gen tok/s':>11}{'peak RSS MB':>13}{'reward@1':>10}{'loss@1':>12}"
        f"{'gen s/step':>12}{'score s/step':>14}"
    )
    for k in kinds:
        rs = by[k]
        gen = common.median([{"v": sum(r.get("generate_s", [])) / r["steps"]} for r in rs], "v")
        score = common.median([{"v": sum(r.get("score_s", [])) / r["steps"]} for r in rs], "v")
        print(
            f"  {names[k]:<32}{common.median(rs, 's_per_step'):8.2f}{common.median(rs, 'gen_tok_s'):11.1f}"
            f"{common.median(rs, 'rss_mb'):13.0f}{common.median(rs, 'reward_1'):10.4f}{common.median(rs, 'loss_1'):12.6f}"
            f"{gen:12.2f}{score:14.2f}"
        )
    for base, ours, target in PAIRS:
        if base in by and ours in by:
            speed = common.median(by[base], "s_per_step") / common.median(by[ours], "s_per_step")
            rss = common.median(by[ours], "rss_mb") / common.median(by[base], "rss_mb")
            same = all(
                abs(common.median(by[base], key) - common.median(by[ours], key)) < 1e-4 for key in ("reward_1", "loss_1")
            )
            # Peak RSS no higher is a target of GRPO and RLOO against TRL's trainers only.
            rss_verdict = "" if ours == "tunestack-ppo" else f" ({'no higher: met' if rss <= 1 else 'HIGHER'})"
            print(
                f"  {ours} / {base}: steps x{speed:.2f} faster (target x{target}: {'met' if speed >= target else 'MISSED'}), "
                f"peak RSS x{rss:.2f}{rss_verdict}; step-1 reward and loss {'equal' if same else 'DIFFER'}"
            )
    for kind in PPO_KINDS:
        if kind in by:
            r = by[kind][0]
            total = sum(r["step_s"])
            parts = ", ".join(f"{p} {sum(v) / r['steps']:.2f} s ({sum(v) / total:.0%})" for p, v in r["phases"].items())
            print(f"  {kind} step {total / r['steps']:.2f} s: {parts}")


def main() -> None:
    if common.child_entry(CHILDREN):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per run (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per system (order alternates each round)")
    parser.add_argument("--systems", default="abcde", help="which of a b c d e f g to run (default abcde)")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (GRPO, RLOO)")
    parser.add_argument("--prompts_per_step", type=int, default=2, help="prompts per step (PPO: x generations)")
    parser.add_argument("--completion_length", type=int, default=64, help="most tokens generated per completion")
    parser.add_argument("--ppo_mini_batch", type=int, default=2, help="PPO minibatch (tunestack's default 2)")
    parser.add_argument("--ppo_epochs", type=int, default=4, help="PPO epochs per batch (tunestack's default 4)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--trl_gradient_checkpointing", action="store_true",
                        help="keep TRL's default gradient checkpointing (off by default, as in tunestack)")  # fmt: skip
    parser.add_argument("--baseline_src", default=None, help="system g: an earlier tunestack source tree")
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", default=None, help="scratch folder, kept (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    args = parser.parse_args()
    args.systems = [s for s in args.systems.replace(",", "") if s in SYSTEMS] or list(SYSTEMS)
    if "g" in args.systems:
        if not args.baseline_src or not (Path(args.baseline_src) / "src" / "tunestack").is_dir():
            parser.error("system g needs --baseline_src: a tunestack source tree (with src/tunestack)")
        args.baseline_src = str(Path(args.baseline_src).resolve())

    common.run_in_workdir(args, run_bench, "rl")


if __name__ == "__main__":
    main()
