"""Options of `tunestack chat` and `tunestack infer`: which model to talk to and how to generate
(MedicalGPT inference.py / gradio_demo.py names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunestack.config.model import DTYPES


def sampling_problems(
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    repetition_penalty: float | None,
    do_sample: bool | None = None,
    prefix: str = "--",
) -> list[str]:
    """What is wrong with the sampling options given (None: not given); flag names start with `prefix`."""
    out = []
    if temperature is not None and temperature < 0:
        out.append(f"{prefix}temperature must be >= 0 (0 means greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        out.append(f"{prefix}top_p must be in (0, 1]")
    if top_k is not None and top_k < 0:
        out.append(f"{prefix}top_k must be >= 0")
    if repetition_penalty is not None and repetition_penalty <= 0:
        out.append(f"{prefix}repetition_penalty must be > 0")
    if do_sample and temperature == 0:
        out.append(f"{prefix}do_sample true needs {prefix}temperature > 0")
    return out


@dataclass
class ModelSelection:
    """Which model to talk to (chat, infer)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Model: a tunestack stage output or merged folder, a HF folder, a .gguf file, or a built-in "
            "alias (default: smollm2-135m-instruct)."
        },
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "Same as --model."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model for --lora_model (MedicalGPT style); same as --model otherwise."}
    )
    lora_model: str | None = field(
        default=None, metadata={"help": "An adapter (or stage output) folder to stack on the base model."}
    )
    adapter: str | None = field(default=None, metadata={"help": "Same as --lora_model."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder, when not the model's."})
    template_name: str | None = field(
        default=None,
        metadata={"help": "A named chat template (vicuna, chatml, qwen, llama3 ...); default: the tokenizer's own."},
    )
    tool_format: str = field(
        default="auto",
        metadata={
            "help": "How tools and calls are written and read back: auto (as the model folder's chat template "
            "says: the format it was trained with), default, qwen, glm4 or llama3."
        },
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.", "choices": DTYPES},
    )
    device_map: str | None = field(default=None, metadata={"help": "accelerate device map (default: auto on GPU)."})
    only_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when a GPU is present."})
    cpu_only: bool = field(default=False, metadata={"help": "Same as --only_cpu."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the model in 8-bit (bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the model in 4-bit NF4 (bitsandbytes)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model folder's own Python code."})
    allow_pickle: bool = field(
        default=False, metadata={"help": "Load pickled weights (*.bin) with torch's weights_only loader."}
    )
    resize_emb: bool = field(
        default=False, metadata={"help": "Accepted for compatibility: embeddings grow to the tokenizer automatically."}
    )
    model_type: str | None = field(default=None, metadata={"help": "Accepted for compatibility; ignored."})

    def problems(self) -> list[str]:
        from tunestack.data.tool_formats import tool_format_problems

        out = tool_format_problems(self.tool_format)
        names = [n for n in (self.model, self.model_name_or_path, self.base_model) if n]
        if len(set(names)) > 1:
            out.append("--model, --model_name_or_path and --base_model name the same thing; give one of them")
        if self.lora_model and self.adapter and self.lora_model != self.adapter:
            out.append("--adapter is a synonym of --lora_model; give only one of them")
        if self.load_in_4bit and self.load_in_8bit:
            out.append("--load_in_4bit and --load_in_8bit exclude each other")
        return out

    @property
    def reference(self) -> str | None:
        return self.model or self.model_name_or_path or self.base_model

    @property
    def adapter_path(self) -> str | None:
        return self.lora_model or self.adapter


@dataclass
class GenerationArguments:
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt of every conversation (default: the one the model was trained with, if any)."},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer, in tokens."})
    temperature: float | None = field(
        default=None,
        metadata={"help": "Sampling temperature; 0 means greedy (default: the model's generation_config.json)."},
    )
    top_p: float | None = field(
        default=None,
        metadata={"help": "Nucleus sampling: keep the tokens of this much probability (default: the model's, else 1)."},
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "Sample among the k most likely tokens, 0 for all (default: the model's, else 50)."},
    )
    repetition_penalty: float | None = field(
        default=None, metadata={"help": "Penalty for repeated tokens, 1.0 for none (default: the model's, else 1.0)."}
    )
    do_sample: bool | None = field(
        default=None,
        metadata={
            "help": "Sample (true) or decode greedily (false); default: sample when --temperature > 0, else as the "
            "model's generation_config.json says, else greedy."
        },
    )
    seed: int | None = field(default=None, metadata={"help": "Random seed, for repeatable sampling."})
    stop_str: str | None = field(
        default=None, metadata={"help": "Extra text that ends an answer (comma-separated for several); cut off."}
    )

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append("--max_new_tokens must be at least 1")
        out += sampling_problems(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.do_sample)
        return out

    @property
    def stop_strings(self) -> list[str]:
        return [s for s in (self.stop_str or "").split(",") if s.strip()]


@dataclass
class ChatArguments:
    prompt: str | None = field(
        default=None, metadata={"help": "Answer this one prompt, print only the answer, and exit (for scripts)."}
    )
    single_tune: bool = field(
        default=False, metadata={"help": "Answer each question on its own, without the conversation history."}
    )
    show_prompt: bool = field(
        default=False, metadata={"help": "Print the exact prompt given to the model before each answer (to stderr)."}
    )
    tools: str | None = field(
        default=None,
        metadata={
            "help": "A JSON file of tools the model may call (a list of function schemas, or {\"tools\": [...]}). "
            "A call is shown and its result asked for (the answer continues from it); with --prompt the calls are "
            "printed as JSON lines."
        },
    )


@dataclass
class InferArguments:
    data_file: str | None = field(
        default=None, metadata={"help": "Prompts: .txt (one per line) or .jsonl/.json/.csv/.parquet records."}
    )
    output_file: str = field(default="predictions.jsonl", metadata={"help": "Where the answers go (jsonl)."})
    eval_batch_size: int = field(default=4, metadata={"help": "Prompts generated together (left padded)."})
    interactive: bool = field(default=False, metadata={"help": "Chat instead (same as tunestack chat)."})
    single_tune: bool = field(default=False, metadata={"help": "With --interactive: no conversation history."})

    def problems(self) -> list[str]:
        out = []
        if self.eval_batch_size < 1:
            out.append("--eval_batch_size must be at least 1")
        if not self.interactive and not self.data_file:
            out.append("--data_file is required (or --interactive to chat)")
        return out
