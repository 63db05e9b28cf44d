"""A PPO run of the RL stage: the loop of rl/ppo.py driven over the prompts, with logging, samples, checkpoints,
the final save and the before/after evaluation."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tunestack.checkpoints import STAGING_DIR, commit_checkpoint, saving, verify_saved_model
from tunestack.config.deepspeed import zero_stage
from tunestack.data.prompts import PromptEncoder
from tunestack.data.templates import get_template, stop_token_ids
from tunestack.errors import ConfigError
from tunestack.model.value_head import VALUE_HEAD_FILE
from tunestack.rl.engine import ppo_accelerator
from tunestack.rl.ppo import PPOLoop, PPOSettings
from tunestack.rl.rewards import build_reward_functions, total_reward
from tunestack.rundir import append_metrics, promote_final
from tunestack.train.callbacks import GracefulStop, StopRequested
from tunestack.train.chat_files import save_chat_files
from tunestack.train.distributed import gathered
from tunestack.train.plots import plot_curves

logger = logging.getLogger("tunestack")


def ppo_settings(args: Any, n_prompts: int) -> PPOSettings:
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
        init_kl_coef=d.kl_coef,
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
        packed=t.padding_free and t.sparse_lm_head,
        varlen_attention=t.varlen_attention,
        packed_sampling=t.packed_sampling,
        sampled_old_scores=d.old_logprobs_from_sampling,
    )


class PPORun:
    """One `tunestack rl --algo ppo` run in OUTPUT_DIR."""

    def __init__(self, ctx: Any, model: Any, data: Any, record: dict[str, Any] | None = None):
        args = ctx.args
        self.ctx = ctx
        self.data = data
        self.record = record  # written into every checkpoint's marker (see train/resume.py)
        self.out_dir = Path(args.train.output_dir)
        self.template = get_template(args.data.template_name, ctx.tokenizer, args.data.tool_format)
        functions = build_reward_functions(
            args.data.reward_model,
            data.extras.get("reward_funcs", args.data.reward_funcs),
            args.model.trust_remote_code,
        )

        def reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
            return total_reward(functions, prompts, completions, **kwargs)

        self.settings = ppo_settings(args, len(data.train))
        if args.data.disable_dropout:  # p = 0 in every nn.Dropout, LoRA's included, as TRL's trainers do
            from trl.trainer.utils import disable_dropout_in_model

            disable_dropout_in_model(model)
        ref_model = None
        if not hasattr(model, "disable_adapter"):  # full / freeze tuning: a frozen copy is the reference
            import copy

            if zero_stage(args.train.deepspeed) == 3:
                raise ConfigError(
                    "rl --algo ppo with full or freeze tuning under ZeRO-3 is not supported (its frozen reference "
                    "copy would be partitioned too): use LoRA (the reference is the adapter switched off) or zero2"
                )
            ref_model = copy.deepcopy(model).requires_grad_(False)
        encoder = PromptEncoder(ctx.tokenizer, self.template, args.data.max_source_length)
        stops = stop_token_ids(self.template, ctx.tokenizer)
        accelerator = ppo_accelerator(args.train, self.settings, model.config.hidden_size)
        self.loop = PPOLoop(
            model, ctx.tokenizer, encoder, reward, stops, self.settings, self.out_dir, ref_model, accelerator
        )
        self.acc = self.loop.accelerator

    def run(self, resume_from: Path | None, stop: GracefulStop) -> dict[str, Any]:
        loop, settings, acc, data, clock = self.loop, self.settings, self.acc, self.data, self.ctx.clock
        if resume_from is not None:
            loop.load_state(resume_from)
            logger.info("resuming from %s at step %d", resume_from, loop.step)
        metrics: dict[str, Any] = {}
        if data.eval and resume_from is None:
            with clock("evaluation"):
                before = loop.evaluate(data.eval)
            metrics.update({f"before_eval_{k}": v for k, v in before.items()})
            self._log(0, {f"eval_{k}": v for k, v in before.items()})
        writer = self._tensorboard()
        shard = data.train[acc.process_index :: acc.num_processes]
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.max_steps, initial=loop.step, desc="ppo", disable=not acc.is_main_process)
        while loop.step < settings.max_steps:
            epoch, offset = divmod(loop.step * settings.batch_size, max(len(shard), 1))
            order = list(range(len(shard)))
            random.Random(settings.seed + epoch).shuffle(order)
            batch = [shard[order[(offset + i) % len(order)]] for i in range(settings.batch_size)]
            with clock("training"):
                logs = loop.train_step(batch)
            bar.update(1)
            if loop.step % settings.logging_steps == 0 or loop.step == 1:
                self._log(loop.step, logs, writer)
                bar.set_postfix(reward=f"{logs['reward_mean']:.3f}", kl=f"{logs['kl']:.3f}")
            if settings.sample_every and loop.step % settings.sample_every == 0:
                self._write_samples()
            if settings.save_steps and loop.step % settings.save_steps == 0:
                with clock("checkpoints"):
                    self._checkpoint()
            if stop.should_stop():
                stop.stopped_training = True
                self._checkpoint()
                bar.close()
                return {"global_step": loop.step, "metrics": metrics, "interrupted": True}
        bar.close()
        metrics["train_steps"] = loop.step
        with clock("saving"):
            self._save_final()
        stop.immediate = True  # the policy is saved: a signal now stops the evaluation that follows
        try:
            if stop.requested:
                raise StopRequested(stop.signal_name)
            if data.eval:
                with clock("evaluation"):
                    after = loop.evaluate(data.eval)
                metrics.update({f"eval_{k}": v for k, v in after.items()})
                self._log(loop.step, {f"eval_{k}": v for k, v in after.items()}, writer)
        except StopRequested:
            logger.warning("the final evaluation was stopped by %s; the trained policy is saved", stop.signal_name)
            metrics["evaluation_stopped"] = stop.signal_name
        if acc.is_main_process:
            with clock("plots"):
                plot_curves(self.out_dir, "loss.png", ("policy_loss", "value_loss"), "rl losses")
                plot_curves(self.out_dir, "reward.png", ("reward_mean", "eval_reward"), "reward")
        if writer is not None:
            writer.close()
        return {"global_step": loop.step, "metrics": metrics, "settings": asdict(settings), "interrupted": False}

    def _tensorboard(self) -> Any:
        report = self.ctx.args.train.report_to or []
        if not self.acc.is_main_process or "tensorboard" not in report:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.out_dir / "runs"))

    def _log(self, step: int, logs: dict[str, float], writer: Any = None) -> None:
        if not self.acc.is_main_process:
            return
        append_metrics(self.out_dir, {"step": step, **logs})
        if writer is not None:
            for key, value in logs.items():
                writer.add_scalar(f"rl/{key}", value, step)

    def _write_samples(self, n: int = 3) -> None:
        r = self.loop.last_rollout
        if not self.acc.is_main_process or r is None:
            return
        with open(self.out_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
            for prompt, completion, score in list(zip(r.prompts, r.completions, r.raw_scores.tolist(), strict=True))[
                :n
            ]:
                row = {"step": self.loop.step, "prompt": prompt, "response": completion, "reward": score}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _save_policy(self, folder: Path) -> None:
        """Every process calls it: under ZeRO-3 the weights are gathered first; the main process writes."""
        from safetensors.torch import save_file

        ctx, unwrapped = self.ctx, self.loop.unwrapped
        adapter = hasattr(unwrapped.policy, "peft_config")
        saved = [p for p in unwrapped.policy.parameters() if p.requires_grad or not adapter]
        with gathered(saved + list(unwrapped.value_head.parameters())):
            if not self.acc.is_main_process:
                return
            ids = {id(p) for p in saved}
            state = {n: p.detach().cpu().clone() for n, p in unwrapped.policy.named_parameters() if id(p) in ids}
            unwrapped.policy.save_pretrained(folder, state_dict=state if self.loop.zero3 else None)
            head = {k: v.detach().cpu().contiguous().clone() for k, v in unwrapped.value_head.state_dict().items()}
        ctx.tokenizer.save_pretrained(folder)
        save_chat_files(ctx.tokenizer, self.template, ctx.ref.base_dir if ctx.ref else None, folder)
        save_file(head, str(folder / VALUE_HEAD_FILE))

    def _staged_save(self, name: str, what: str, trained: bool, finish: Any) -> None:
        """A save into .staging/NAME by every process, checked and put in place by the main one."""
        staging = self.out_dir / STAGING_DIR / name
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            staging.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        with saving(staging, what):
            self._save_policy(staging)
            if name != "final":
                self.loop.save_state(staging)
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                verify_saved_model(staging, trained=trained)
                finish(staging)
        self.acc.wait_for_everyone()

    def _checkpoint(self) -> None:
        step = self.loop.step
        final = self.out_dir / f"checkpoint-{step}"
        self._staged_save(
            f"checkpoint-{step}", f"checkpoint-{step}", step > 0, lambda s: commit_checkpoint(s, final, step, self.record)
        )

    def _save_final(self) -> None:
        """Staged and checked like a checkpoint before its files move into OUTPUT_DIR."""
        self._staged_save("final", "the final policy", self.loop.step > 0, lambda s: promote_final(s, self.out_dir))
