"""What a stage saves beside the weights so that every later consumer renders and stops like training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunestack.data.templates import TokenizerTemplate, jinja_chat_template, stop_token_ids


def save_chat_files(tokenizer: Any, template: Any, base_dir: Path | None, output_dir: Path) -> None:
    """The chat template into the tokenizer files and the template's stop tokens into generation_config.json
    (starting from the base model's generation config), so merge, chat, serve and vLLM stop where training
    taught the model to stop. A named tool format in use goes in front of the chat template (see
    tunestack.data.tool_formats), so that tools are rendered and read back as training wrote them."""
    from transformers import GenerationConfig

    if not isinstance(template, TokenizerTemplate) or template.tool_format != "auto":
        tokenizer.chat_template = jinja_chat_template(template)
        tokenizer.save_pretrained(output_dir)
    try:
        gen = GenerationConfig.from_pretrained(base_dir) if base_dir is not None else GenerationConfig()
    except OSError:
        gen = GenerationConfig()
    stops = stop_token_ids(template, tokenizer)
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(output_dir)
