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
from tunestack.errors import ConfigError
from tunestack.model.anatomy import is_native
from tunestack.rl.rewards import build_reward_functions, default_reward_funcs
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
        if d.algo != "ppo" and not is_native(ctx.model_config):
            raise ConfigError(
                f"--algo {d.algo} runs through TRL's fused log-prob head, which reads transformers' own model layout; "
                f"{type(ctx.model_config).__name__} is the model's own code: use --algo ppo"
            )
        prompts = load_prompts(d.train_file_dir, d.data_format, d.system_prompt)
        held: list[Prompt] = []
        if d.validation_file_dir:
            held = load_prompts(d.validation_file_dir, d.data_format, d.system_prompt)
        elif ctx.args.train.do_eval:
            prompts, held = split_held_out(prompts, d.validation_split_percentage, ctx.args.train.seed)
        prompts, held = first_n(prompts, d.max_train_samples), first_n(held, d.max_eval_samples)
        reward_funcs = default_reward_funcs(d.reward_model, d.reward_funcs, [p.answer for p in prompts])
        if reward_funcs == "accuracy" and not d.reward_funcs:
            logger.info("reward: accuracy against each prompt's answer (no --reward_model or --reward_funcs given)")
        fingerprint = hashlib.sha256(json.dumps([p.origin for p in prompts + held]).encode()).hexdigest()[:16]
        stats = {"train_prompts": len(prompts), "eval_prompts": len(held), "reward_funcs": reward_funcs}
        stats["prompts_with_answers"] = sum(p.answer is not None for p in prompts)
        stats["prompts_with_tools"] = sum(bool(p.tools) for p in prompts)
        if d.algo != "ppo":
            prompts, held = self._as_text_dataset(ctx, prompts), self._as_text_dataset(ctx, held) if held else None
        return PreparedData(prompts, held, None, fingerprint, stats, extras={"reward_funcs": reward_funcs})

    def _as_text_dataset(self, ctx: StageContext, prompts: list[Prompt]) -> Any:
        import datasets

        encode = self._encoder(ctx)
        texts = [ctx.tokenizer.decode(encode(p), skip_special_tokens=False) for p in prompts]
        return datasets.Dataset.from_dict({"prompt": texts, "answer": [p.answer for p in prompts]})

    def _encoder(self, ctx: StageContext) -> PromptEncoder:
        return PromptEncoder(
            ctx.tokenizer,
            get_template(ctx.args.data.template_name, ctx.tokenizer, ctx.args.data.tool_format),
            ctx.args.data.max_source_length,
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
        from tunestack.train.fast import head_outside_forward, output_layer_trains
        from tunestack.train.fast.packed_rl import packed_rl_mixins

        train = ctx.args.train
        head_outside = not (train.padding_free and train.sparse_lm_head) or head_outside_forward(
            train, "--sparse_lm_head (packed GRPO / RLOO log-probs)", output_layer_trains(model)
        )
        return packed_rl_mixins(train, ctx.args.data.algo, head_outside)

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
            beta=d.kl_coef,
            disable_dropout=d.disable_dropout,
        )

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        d = ctx.args.data
        functions = build_reward_functions(
            d.reward_model, data.extras.get("reward_funcs", d.reward_funcs), ctx.args.model.trust_remote_code
        )
        return {"processing_class": ctx.tokenizer, "reward_funcs": functions}

    def save_extras(self, ctx: StageContext, output_dir: Path) -> None:
        template = get_template(ctx.args.data.template_name, ctx.tokenizer, ctx.args.data.tool_format)
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
