"""RL stage: PPO (tunestack's own loop) or GRPO / RLOO (TRL) against a reward model or functions."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from tunestack.config.rl import RLArguments
from tunestack.data.prompts import Prompt, PromptEncoder, load_prompts
from tunestack.data.records import first_n, split_held_out
from tunestack.data.templates import get_template
from tunestack.rl.rewards import build_reward_functions
from tunestack.rundir import OutputFolder
from tunestack.train.base import PreparedData, Stage, StageContext, trl_config
from tunestack.train.callbacks import GracefulStop
from tunestack.train.chat_files import save_chat_files

logger = logging.getLogger("tunestack")


class RLStage(Stage):
    name = "rl"
    description = "Reinforcement learning against a reward model or reward functions: PPO, GRPO or RLOO."
    data_class = RLArguments

    def prepare_data(self, ctx: StageContext) -> PreparedData:
        d = ctx.args.data
        prompts = load_prompts(d.train_file_dir, d.data_format, d.system_prompt)
        held: list[Prompt] = []
        if d.validation_file_dir:
            held = load_prompts(d.validation_file_dir, d.data_format, d.system_prompt)
        elif ctx.args.train.do_eval:
            prompts, held = split_held_out(prompts, d.validation_split_percentage, ctx.args.train.seed)
        prompts, held = first_n(prompts, d.max_train_samples), first_n(held, d.max_eval_samples)
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

    def fit(
        self,
        ctx: StageContext,
        model: Any,
        data: PreparedData,
        output: OutputFolder,
        resume_from: Path | None,
        stop: GracefulStop,
    ) -> dict[str, Any]:
        if ctx.args.data.algo != "ppo":
            return super().fit(ctx, model, data, output, resume_from, stop)
        from tunestack.rl.driver import PPORun
        from tunestack.train.resume import resume_record

        return PPORun(ctx, model, data, resume_record(output.manifest)).run(resume_from, stop)

    # ------------------------------------------------------------------- GRPO / RLOO through TRL

    def trainer_class(self, ctx: StageContext) -> type:
        if ctx.args.data.algo == "grpo":
            from trl import GRPOTrainer

            return GRPOTrainer
        from trl import RLOOTrainer

        return RLOOTrainer

    def trainer_mixins(self, ctx: StageContext, model: Any) -> tuple[type, ...]:
        from tunestack.train.fast.packed_rl import packed_rl_mixins

        return packed_rl_mixins(ctx.args.train, ctx.args.data.algo)

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
        d = ctx.args.data
        return {"processing_class": ctx.tokenizer, "reward_funcs": build_reward_functions(d.reward_model, d.reward_funcs)}

    def save_extras(self, ctx: StageContext, output_dir: Path) -> None:
        template = get_template(ctx.args.data.template_name, ctx.tokenizer)
        save_chat_files(ctx.tokenizer, template, ctx.ref.base_dir if ctx.ref else None, output_dir)

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
    return RLStage().main(argv)
