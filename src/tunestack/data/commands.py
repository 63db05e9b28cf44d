"""`tunestack data preview`: see samples as the model will, with the trained span marked."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunestack.config.parse import parse_into, print_help
from tunestack.errors import ConfigError


@dataclass
class PreviewArguments:
    train_file_dir: str | None = field(default=None, metadata={"help": "Chat data file(s) or folder(s)."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model whose tokenizer is used (default: the embedded SmolLM2)."}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer folder, if different."})
    template_name: str | None = field(
        default=None, metadata={"help": "Named chat template (default: the tokenizer's own)."}
    )
    tool_format: str = field(
        default="auto", metadata={"help": "auto (the template's own tool support, else default), default, qwen, glm4, llama3."}
    )
    data_format: str = field(default="auto", metadata={"help": "auto, sharegpt, messages, alpaca or prompt_response."})
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt for conversations without one."})
    model_max_length: int = field(default=512, metadata={"help": "Tokens per sample, as in training."})
    num_samples: int = field(default=3, metadata={"help": "How many samples to render."})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Preview the good records of a file with bad ones."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the tokenizer's own code."})

    def problems(self) -> list[str]:
        return [] if self.train_file_dir else ["--train_file_dir is required"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tunestack data preview --train_file_dir DATA [--model_name_or_path M] [--template_name T]")  # noqa: T201
        return 0
    sub, rest = argv[0], argv[1:]
    if sub != "preview":
        raise ConfigError(f"unknown data command '{sub}' (known: preview)")
    if "-h" in rest or "--help" in rest:
        print_help((PreviewArguments,), "tunestack data preview", __doc__ or "")
        return 0
    (args,) = parse_into((PreviewArguments,), rest, prog="tunestack data preview")
    from tunestack.data.formats import CONVERSATIONS
    from tunestack.data.preview import preview
    from tunestack.data.records import load_files, with_default_system
    from tunestack.data.templates import get_template
    from tunestack.model.load import load_tokenizer
    from tunestack.model.ref import resolve_model

    ref = None if args.tokenizer_name_or_path else resolve_model(args.model_name_or_path)
    tokenizer = load_tokenizer(ref, args.tokenizer_name_or_path, args.trust_remote_code)
    template = get_template(args.template_name, tokenizer, args.tool_format)
    _, loaded = load_files(args.train_file_dir, CONVERSATIONS, args.data_format, args.skip_bad_records)
    conversations = with_default_system(loaded.items, args.system_prompt)
    print(f"{loaded.summary()}\n")  # noqa: T201
    print(preview(conversations, tokenizer, template, args.model_max_length, n=args.num_samples))  # noqa: T201
    return 0
