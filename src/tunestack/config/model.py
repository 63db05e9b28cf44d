"""Which model to load and how."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A local HF folder, a .gguf file, a tunestack stage output folder, or a built-in alias "
            "(default: smollm2-135m-instruct, the embedded SmolLM2-135M-Instruct)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder, when it differs from the model's."}
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Accepted for compatibility with older scripts; the type is detected."}
    )
    model_config: str | None = field(
        default=None, metadata={"help": "Train from scratch: a config.json whose architecture is freshly initialised."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch with the model's config changed, e.g. num_hidden_layers=12,hidden_size=1024."
        },
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (float32 on CPU, the checkpoint's on GPU), float32, bfloat16, float16.",
            "choices": DTYPES,
        },
    )
    device_map: str | None = field(
        default=None,
        metadata={"help": "accelerate device map for a single process (e.g. auto); ignored under torchrun."},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8-bit (bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4-bit NF4 (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit type: nf4 or fp4.", "choices": ("nf4", "fp4")}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit quantization constants."}
    )
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={"help": "Compute dtype of 4-bit layers (auto: bfloat16 on GPU, float32 on CPU).", "choices": DTYPES},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model folder's own Python code (ChatGLM, InternLM2...). Off unless asked."},
    )
    allow_pickle: bool = field(
        default=False,
        metadata={"help": "Load pickled weights (*.bin, *.pt) with torch's weights_only loader; refused otherwise."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa or flash_attention_2 (default: the library's choice)."}
    )
    flash_attn: bool = field(
        default=False,
        metadata={
            "help": "FlashAttention-2 (MedicalGPT's flag): used where the flash-attn package and a CUDA GPU are; "
            "elsewhere a warning and SDPA. --attn_implementation wins."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where processed datasets are cached."})
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Use the fast (Rust) tokenizer when there is one."}
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Accepted for compatibility; models load offline."}
    )
    hf_hub_token: str | None = field(
        default=None, metadata={"help": "Accepted for compatibility; never sent anywhere."}
    )

    def problems(self) -> list[str]:
        out = []
        if self.load_in_4bit and self.load_in_8bit:
            out.append("--load_in_4bit and --load_in_8bit exclude each other")
        if self.model_config and self.config_overrides:
            out.append("give either --model_config or --config_overrides, not both")
        return out

    @property
    def from_scratch(self) -> bool:
        return bool(self.model_config or self.config_overrides)
