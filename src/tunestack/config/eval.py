"""Options of `tunestack eval`."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunestack.config.infer import GenerationArguments
from tunestack.config.model import DTYPES

SEGMENTATION = ("auto", "jieba", "char")
MCQ_METHODS = ("letter", "cloze")
BENCHMARK_ENGINES = ("tunestack", "lm_eval")


@dataclass
class EvalArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model(s) to evaluate, comma separated: stage output folders, HF folders, .gguf files or "
            "aliases (default: smollm2-135m-instruct)."
        },
    )
    include_base: bool = field(
        default=True,
        metadata={"help": "Also evaluate the base model under the first model (labelled 'base'), for before/after."},
    )
    eval_text_dir: str | None = field(
        default=None, metadata={"help": "Held-out text (.txt, or json/jsonl with 'text') for perplexity."}
    )
    eval_file: str | None = field(
        default=None,
        metadata={
            "help": "Prompts with reference answers (jsonl/json/csv/parquet: prompt/question/instruction + "
            "reference/answer/output, or SFT conversations whose last answer is the reference)."
        },
    )
    probe_prompts: str | None = field(
        default=None,
        metadata={"help": "Probe prompts (.txt lines or jsonl); default: a built-in list; 'none' for no probes."},
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "A tunestack rm output: score every answer with it (also --reward_model_path)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where eval.json and predictions.jsonl go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an earlier eval in --output_dir."})
    template_name: str | None = field(default=None, metadata={"help": "Chat template (default: the tokenizer's)."})
    torch_dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16.", "choices": DTYPES})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model folder's own Python code."})
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts generated (or text blocks scored) together."})
    block_size: int = field(default=256, metadata={"help": "Tokens per perplexity block."})
    max_eval_blocks: int | None = field(default=200, metadata={"help": "Perplexity on at most N blocks (-1: all)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most N prompts of --eval_file."})
    segmentation: str = field(
        default="auto",
        metadata={
            "help": "Chinese word segmentation for BLEU/ROUGE: auto (jieba if installed, else characters), "
            "jieba or char.",
            "choices": SEGMENTATION,
        },
    )

    def problems(self) -> list[str]:
        out = []
        if not self.output_dir:
            out.append("--output_dir is required")
        if self.eval_batch_size < 1:
            out.append("--eval_batch_size must be at least 1")
        if self.block_size < 2:
            out.append("--block_size must be at least 2")
        return out

    @property
    def models(self) -> list[str]:
        names = [m.strip() for m in (self.model_name_or_path or "").split(",") if m.strip()]
        return names or ["smollm2-135m-instruct"]


@dataclass
class BenchmarkArguments:
    benchmark_dir: str | None = field(
        default=None,
        metadata={
            "help": "Multiple-choice benchmark folder(s) in the MMLU, C-Eval, CMMLU or a generic jsonl/csv layout "
            "(detected per folder); comma separated, or the flag repeated."
        },
    )
    n_shot: int = field(default=5, metadata={"help": "Answered dev questions shown before each question."})
    mcq_method: str = field(
        default="letter",
        metadata={
            "help": "letter: the next-token log-probability of each answer letter after 'Answer:'; cloze: the "
            "length-normalised log-likelihood of each choice's text.",
            "choices": MCQ_METHODS,
        },
    )
    mcq_chat_template: bool = field(
        default=False, metadata={"help": "Wrap each benchmark prompt in the model's chat template (default: plain)."}
    )
    benchmark_split: str = field(
        default="auto",
        metadata={"help": "Split scored: auto (test, or val where test has no answers), test, val.",
                  "choices": ("auto", "test", "val")},
    )  # fmt: skip
    benchmark_lang: str = field(
        default="auto",
        metadata={"help": "Prompt language: auto (Chinese for C-Eval/CMMLU and Chinese questions), en, zh.",
                  "choices": ("auto", "en", "zh")},
    )  # fmt: skip
    max_benchmark_questions: int | None = field(
        default=None, metadata={"help": "Score at most N questions of each subject (a quick look)."}
    )
    mcq_max_length: int | None = field(
        default=None, metadata={"help": "Longest benchmark prompt in tokens (default: the model's context)."}
    )
    benchmark_engine: str = field(
        default="tunestack",
        metadata={"help": "tunestack, or lm_eval (lm-evaluation-harness on the same folders).", "choices": BENCHMARK_ENGINES},
    )
    drift_probe: int = field(
        default=0,
        metadata={
            "help": "Answer N held-out general prompts with every model and compare with the base model's answers "
            "(ROUGE-L, perplexity of the base answers); 0: off."
        },
    )
    drift_prompts: str | None = field(
        default=None,
        metadata={"help": "Prompts of the drift probe (every sixth is used); default: the built-in general set."},
    )

    def problems(self) -> list[str]:
        out = []
        if self.n_shot < 0:
            out.append(f"--n_shot must be >= 0, got {self.n_shot}")
        if self.drift_probe < 0:
            out.append(f"--drift_probe must be >= 0, got {self.drift_probe}")
        if self.mcq_max_length is not None and self.mcq_max_length < 8:
            out.append(f"--mcq_max_length must be at least 8, got {self.mcq_max_length}")
        if self.benchmark_engine == "lm_eval" and self.mcq_chat_template:
            out.append("--benchmark_engine lm_eval builds its own chat prompts: use it without --mcq_chat_template")
        return out


@dataclass
class EvalGenerationArguments(GenerationArguments):
    """Generation options with evaluation defaults: greedy decoding, short answers."""

    max_new_tokens: int = field(default=128, metadata={"help": "Longest answer, in tokens."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 (default) is greedy."})


def option_classes() -> tuple[type, ...]:
    return (EvalArguments, BenchmarkArguments, EvalGenerationArguments)
