"""Options of the RL stage (MedicalGPT ppo_training.py names, plus GRPO/RLOO)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunestack.config.parse import hub_dataset_problem

ALGOS = ("ppo", "grpo", "rloo")


@dataclass
class RLArguments:
    algo: str = field(default="ppo", metadata={"help": "ppo (tunestack's own), grpo or rloo (TRL).", "choices": ALGOS})
    reward_model: str | None = field(
        default=None, metadata={"help": "A tunestack RM output folder (also --reward_model_name_or_path)."}
    )
    reward_funcs: str | None = field(
        default=None,
        metadata={
            "help": "Python reward functions, comma separated module:function (or file.py:function), or 'accuracy'. "
            "With neither this nor --reward_model, question/answer records get the accuracy reward (MedicalGPT's "
            "GRPO rule): 1 when the completion's answer (inside <answer>...</answer> or after '####' when it has "
            "them, else the whole completion) equals the record's `answer` (numbers compared as numbers, text "
            "without case, spaces and final punctuation), else 0."
        },
    )
    train_file_dir: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: SFT-format files (their prompt side is used) or prompt/question records, .txt lines."
        },
    )
    validation_file_dir: str | None = field(
        default=None, metadata={"help": "Held-out prompts for the before/after eval."}
    )
    validation_split_percentage: float = field(
        default=10, metadata={"help": "Percent of prompts held out when no validation files."}
    )
    data_format: str = field(default="auto", metadata={"help": "Format of SFT-style prompt files."})
    template_name: str | None = field(default=None, metadata={"help": "Chat template (default: the tokenizer's own)."})
    tool_format: str = field(
        default="auto",
        metadata={
            "help": "How tools, calls and results are written: auto (the chat template's own tool support, else "
            "default), default (Action: / Action Input: lines, as MedicalGPT), qwen, glm4 or llama3; saved with "
            "the model's chat template."
        },
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt for prompts without one."})
    batch_size: int = field(default=8, metadata={"help": "Prompts rolled out per step and process."})
    mini_batch_size: int = field(default=2, metadata={"help": "PPO minibatch size."})
    ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs over each rollout batch."})
    old_logprobs_from_sampling: bool = field(
        default=True,
        metadata={
            "help": "PPO in float32: the old policy's log-probs, values and entropies are read off the sampling "
            "passes (the policy that sampled is the old policy) instead of a pass over the batch of their own; "
            "equal to float rounding. Off: that pass, as before."
        },
    )
    max_source_length: int = field(default=256, metadata={"help": "Prompt tokens kept (the end of the prompt)."})
    max_target_length: int = field(
        default=64, metadata={"help": "Response tokens generated (also --max_completion_length)."}
    )
    min_target_length: int = field(
        default=0, metadata={"help": "Accepted for compatibility; forcing a minimum length biases the KL."}
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of rollouts; PPO scores its samples (ratio, KL) under the same logits / "
            "temperature, as TRL's trainers do."
        },
    )
    init_kl_coef: float = field(default=0.2, metadata={"help": "Initial KL penalty coefficient."})
    beta: float | None = field(
        default=None,
        metadata={"help": "KL coefficient against the reference (MedicalGPT's GRPO flag); sets --init_kl_coef."},
    )
    use_vllm: bool = field(
        default=False,
        metadata={"help": "Accepted as False (MedicalGPT's flag): completions are generated with transformers."},
    )
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "Adapt the KL coefficient toward --target_kl."})
    target_kl: float = field(
        default=0.1, metadata={"help": "Target KL for the adaptive controller and early stopping."}
    )
    reward_baseline: float = field(default=0.0, metadata={"help": "Subtracted from every reward."})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip rewards to ±this."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards."})
    missing_eos_penalty: float | None = field(
        default=1.0, metadata={"help": "Subtracted from the reward of a response that never emits the stop token."}
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Switch dropout off in the policy: the PPO ratio and GRPO/RLOO log-probs compare the same "
            "network, which dropout would make noisy."
        },
    )
    early_stopping: bool = field(
        default=False, metadata={"help": "End a PPO epoch early when KL runs past 1.5x --target_kl."}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip."})
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    num_generations: int = field(default=4, metadata={"help": "GRPO/RLOO: completions per prompt."})
    sample_every: int = field(
        default=5, metadata={"help": "Write a few (prompt, response, reward) rows to samples.jsonl every N steps."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most N training prompts."})
    max_eval_samples: int | None = field(default=16, metadata={"help": "Held-out prompts for the before/after eval."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub datasets are not fetched; use local files."})

    @property
    def kl_coef(self) -> float:
        return self.beta if self.beta is not None else self.init_kl_coef

    def problems(self) -> list[str]:
        from tunestack.data.tool_formats import tool_format_problems

        out = tool_format_problems(self.tool_format)
        if not self.train_file_dir:
            out.append("--train_file_dir is required")
        if self.use_vllm:
            out.append("--use_vllm True: tunestack generates RL completions with transformers, not vLLM; pass False")
        if self.beta is not None and self.beta < 0:
            out.append(f"--beta must not be negative, got {self.beta}")
        if self.batch_size % self.mini_batch_size:
            out.append("--batch_size must be a multiple of --mini_batch_size")
        if not self.temperature > 0:
            out.append(f"--temperature must be positive (rollouts are sampled), got {self.temperature}")
        out += hub_dataset_problem(self.dataset_name)
        return out
