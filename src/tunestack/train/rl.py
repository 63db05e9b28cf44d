"""RL stage: PPO (tunestack's own loop) or GRPO / RLOO (TRL) against a reward model or functions."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tunestack.config.rl import RLArguments
from tunestack.data.prompts import Prompt, load_prompts
from tunestack.data.supervised import SegmentTokenizer
from tunestack.data.templates import get_template, stop_token_ids
from tunestack.rl.ppo import PPOLoop, PPOSettings
from tunestack.rl.rewards import build_reward_functions, total_reward
from tunestack.train.base import PreparedData, Stage, StageArgs, StageContext, stage_main, trl_config
from tunestack.train.callbacks import GracefulStop
from tunestack.train.checkpoint import STAGING_DIR, commit_checkpoint, verify_saved_model
from tunestack.train.output import OutputFolder
from tunestack.train.plots import plot_curves
from tunestack.train.sft import save_chat_files

logger = logging.getLogger("tunestack")


class PromptEncoder:
    """Prompt -> ids with the SFT template (the policy sees what it was trained on), keeping the end."""

    def __init__(self, tokenizer: Any, template: Any, max_length: int):
        self.encoder = SegmentTokenizer(tokenizer, template)
        self.max_length = max_length

    def __call__(self, prompt: Prompt) -> list[int]:
        ids = self.encoder.encode_prompt(list(prompt.messages), prompt.system)
        return ids[-self.max_length :]


class RLStage(Stage):
    name = "rl"
    description = "Reinforcement learning against a reward model or reward functions: PPO, GRPO or RLOO."
    data_class = RLArguments

    def validate(self, args: StageArgs) -> list[str]:
        return []

    def prepare_data(self, ctx: StageContext) -> PreparedData:
        d = ctx.args.data
        prompts = load_prompts(d.train_file_dir, d.data_format, d.system_prompt)
        if d.validation_file_dir:
            held = load_prompts(d.validation_file_dir, d.data_format, d.system_prompt)
        else:
            rng = random.Random(ctx.args.train.seed)
            shuffled = prompts[:]
            rng.shuffle(shuffled)
            n_eval = max(1, int(len(prompts) * d.validation_split_percentage / 100)) if len(prompts) > 1 else 0
            held, prompts = shuffled[:n_eval], shuffled[n_eval:]
        if d.max_train_samples and d.max_train_samples > 0:
            prompts = prompts[: d.max_train_samples]
        if d.max_eval_samples and d.max_eval_samples > 0:
            held = held[: d.max_eval_samples]
        fingerprint = hashlib.sha256(json.dumps([p.origin for p in prompts + held]).encode()).hexdigest()[:16]
        stats = {"train_prompts": len(prompts), "eval_prompts": len(held)}
        if d.algo != "ppo":
            prompts, held = self._as_text_dataset(ctx, prompts), self._as_text_dataset(ctx, held) if held else None
        return PreparedData(prompts, held, None, fingerprint, stats)

    def _as_text_dataset(self, ctx: StageContext, prompts: list[Prompt]) -> Any:
        import datasets

        encode = self._encoder(ctx)
        texts = [ctx.tokenizer.decode(encode(p), skip_special_tokens=False) for p in prompts]
        return datasets.Dataset.from_dict({"prompt": texts})

    def _encoder(self, ctx: StageContext) -> PromptEncoder:
        return PromptEncoder(
            ctx.tokenizer, get_template(ctx.args.data.template_name, ctx.tokenizer), ctx.args.data.max_source_length
        )

    def _rewards(self, ctx: StageContext) -> list[Any]:
        return build_reward_functions(ctx.args.data.reward_model, ctx.args.data.reward_funcs)

    # ------------------------------------------------------------------- GRPO / RLOO through TRL

    def trainer_class(self) -> type:
        algo = self._algo
        if algo == "grpo":
            from trl import GRPOTrainer

            return GRPOTrainer
        from trl import RLOOTrainer

        return RLOOTrainer

    def trainer_args(self, ctx: StageContext) -> Any:
        d = ctx.args.data
        if d.algo == "grpo":
            from trl import GRPOConfig as config_class
        else:
            from trl import RLOOConfig as config_class
        per_device = ctx.args.train.per_device_train_batch_size
        # TRL needs the generation batch divisible by num_generations.
        per_device = max(d.num_generations, per_device - per_device % d.num_generations)
        return trl_config(
            config_class,
            ctx.args.train,
            per_device_train_batch_size=per_device,
            num_generations=d.num_generations,
            max_completion_length=d.max_target_length,
            temperature=d.temperature,
            beta=d.init_kl_coef,
            disable_dropout=d.disable_dropout,
        )

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        return {"processing_class": ctx.tokenizer, "reward_funcs": self._rewards(ctx)}

    # ------------------------------------------------------------------- PPO

    def _train(self, ctx, model, data, output: OutputFolder, resume_from: Path | None, stop: GracefulStop):
        self._algo = ctx.args.data.algo
        if self._algo != "ppo":
            return super()._train(ctx, model, data, output, resume_from, stop)
        return self._train_ppo(ctx, model, data, output, resume_from, stop)

    def _settings(self, args: StageArgs, n_prompts: int) -> PPOSettings:
        d, t = args.data, args.train
        steps = (
            t.max_steps
            if t.max_steps and t.max_steps > 0
            else max(1, math.ceil(n_prompts / d.batch_size) * math.ceil(t.num_train_epochs))
        )
        return PPOSettings(
            batch_size=d.batch_size,
            mini_batch_size=d.mini_batch_size,
            ppo_epochs=d.ppo_epochs,
            max_new_tokens=d.max_target_length,
            temperature=d.temperature,
            init_kl_coef=d.init_kl_coef,
            adap_kl_ctrl=d.adap_kl_ctrl,
            target_kl=d.target_kl,
            gamma=d.gamma,
            lam=d.lam,
            clip_range=d.cliprange,
            clip_range_value=d.cliprange_value,
            vf_coef=d.vf_coef,
            whiten_rewards=d.whiten_rewards,
            reward_baseline=d.reward_baseline,
            reward_clip=d.reward_clip,
            missing_eos_penalty=d.missing_eos_penalty,
            early_stopping=d.early_stopping,
            learning_rate=t.learning_rate,
            max_grad_norm=t.max_grad_norm,
            max_steps=steps,
            save_steps=int(t.save_steps) if t.save_strategy != "no" else 0,
            logging_steps=max(1, int(t.logging_steps)),
            sample_every=d.sample_every,
            seed=t.seed,
        )

    def _train_ppo(self, ctx, model, data, output, resume_from, stop) -> dict[str, Any]:
        args = ctx.args
        out_dir = Path(args.train.output_dir)
        template = get_template(args.data.template_name, ctx.tokenizer)
        stops = stop_token_ids(template, ctx.tokenizer)
        functions = self._rewards(ctx)

        def reward(prompts, completions, completions_with_stop):
            return total_reward(functions, prompts, completions, completions_with_stop=completions_with_stop)

        settings = self._settings(args, len(data.train))
        if args.data.disable_dropout:  # p = 0 in every nn.Dropout, LoRA's included, as TRL's trainers do
            from trl.trainer.utils import disable_dropout_in_model

            disable_dropout_in_model(model)
        ref_model = None
        if not hasattr(model, "disable_adapter"):  # full / freeze tuning: a frozen copy is the reference
            import copy

            ref_model = copy.deepcopy(model).requires_grad_(False)
        loop = PPOLoop(model, ctx.tokenizer, self._encoder(ctx), reward, stops, settings, out_dir, ref_model)
        acc = loop.accelerator
        if resume_from is not None:
            loop.load_state(resume_from)
            logger.info("resuming from %s at step %d", resume_from, loop.step)
        metrics: dict[str, Any] = {}
        if data.eval and resume_from is None:
            before = loop.evaluate(data.eval)
            metrics.update({f"before_eval_{k}": v for k, v in before.items()})
            self._log(acc, out_dir, 0, {f"eval_{k}": v for k, v in before.items()})
        writer = self._tensorboard(acc, args, out_dir)
        shard = data.train[acc.process_index :: acc.num_processes]
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.max_steps, initial=loop.step, desc="ppo", disable=not acc.is_main_process)
        while loop.step < settings.max_steps:
            epoch, offset = divmod(loop.step * settings.batch_size, max(len(shard), 1))
            order = list(range(len(shard)))
            random.Random(settings.seed + epoch).shuffle(order)
            batch = [shard[order[(offset + i) % len(order)]] for i in range(settings.batch_size)]
            logs = loop.train_step(batch)
            bar.update(1)
            if loop.step % settings.logging_steps == 0 or loop.step == 1:
                self._log(acc, out_dir, loop.step, logs, writer)
                bar.set_postfix(reward=f"{logs['reward_mean']:.3f}", kl=f"{logs['kl']:.3f}")
            if settings.sample_every and loop.step % settings.sample_every == 0:
                self._write_samples(acc, out_dir, loop)
            if settings.save_steps and loop.step % settings.save_steps == 0:
                self._checkpoint(acc, loop, out_dir, ctx, template)
            if stop._agreed():
                stop.requested = True
                self._checkpoint(acc, loop, out_dir, ctx, template)
                bar.close()
                return {"global_step": loop.step, "metrics": metrics}
        bar.close()
        metrics["train_steps"] = loop.step
        self._save_final(acc, loop, out_dir, ctx, template)
        if data.eval:
            after = loop.evaluate(data.eval)
            metrics.update({f"eval_{k}": v for k, v in after.items()})
            self._log(acc, out_dir, loop.step, {f"eval_{k}": v for k, v in after.items()}, writer)
        if acc.is_main_process:
            plot_curves(out_dir / "metrics.jsonl", out_dir / "loss.png", ("policy_loss", "value_loss"), "rl losses")
            plot_curves(out_dir / "metrics.jsonl", out_dir / "reward.png", ("reward_mean", "eval_reward"), "reward")
        if writer is not None:
            writer.close()
        return {"global_step": loop.step, "metrics": metrics, "settings": asdict(settings)}

    def _tensorboard(self, acc, args: StageArgs, out_dir: Path):
        report = args.train.report_to or []
        if not acc.is_main_process or "tensorboard" not in report:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(out_dir / "runs"))

    def _log(self, acc, out_dir: Path, step: int, logs: dict[str, float], writer: Any = None) -> None:
        if not acc.is_main_process:
            return
        with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **logs}) + "\n")
        if writer is not None:
            for key, value in logs.items():
                writer.add_scalar(f"rl/{key}", value, step)

    def _write_samples(self, acc, out_dir: Path, loop: PPOLoop, n: int = 3) -> None:
        r = loop._last_rollout
        if not acc.is_main_process:
            return
        with open(out_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
            for prompt, completion, score in list(zip(r.prompts, r.completions, r.raw_scores.tolist(), strict=True))[
                :n
            ]:
                row = {"step": loop.step, "prompt": prompt, "response": completion, "reward": score}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _save_policy(self, loop: PPOLoop, folder: Path, ctx: StageContext, template: Any) -> None:
        from safetensors.torch import save_file

        unwrapped = loop.unwrapped
        unwrapped.policy.save_pretrained(folder)
        ctx.tokenizer.save_pretrained(folder)
        save_chat_files(ctx, template, folder)
        head = {k: v.detach().cpu().contiguous() for k, v in unwrapped.value_head.state_dict().items()}
        save_file(head, str(folder / "value_head.safetensors"))

    def _checkpoint(self, acc, loop: PPOLoop, out_dir: Path, ctx: StageContext, template: Any) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            staging = out_dir / STAGING_DIR / f"checkpoint-{loop.step}"
            staging.mkdir(parents=True, exist_ok=True)
            self._save_policy(loop, staging, ctx, template)
            loop.save_state(staging)
            verify_saved_model(staging, loop.unwrapped.policy, trained=loop.step > 0)
            commit_checkpoint(staging, out_dir / f"checkpoint-{loop.step}", loop.step)
        acc.wait_for_everyone()

    def _save_final(self, acc, loop: PPOLoop, out_dir: Path, ctx: StageContext, template: Any) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._save_policy(loop, out_dir, ctx, template)
            verify_saved_model(out_dir, loop.unwrapped.policy, trained=loop.step > 0)
        acc.wait_for_everyone()

    def save_extras(self, ctx: StageContext, output_dir: Path) -> None:
        save_chat_files(ctx, get_template(ctx.args.data.template_name, ctx.tokenizer), output_dir)

    def summary_lines(self, ctx: StageContext, data: PreparedData, result: dict[str, Any]) -> list[str]:
        m = result["metrics"]
        lines = [f"prompts: {data.stats['train_prompts']} train / {data.stats['eval_prompts']} held out"]
        if "eval_reward" in m and "before_eval_reward" in m:
            lines.append(
                f"held-out reward: {m['before_eval_reward']:.3f} -> {m['eval_reward']:.3f}; "
                f"KL to reference: {m['before_eval_kl']:.3f} -> {m['eval_kl']:.3f}"
            )
        return lines


def main(argv: list[str]) -> int:
    return stage_main(RLStage(), argv)
