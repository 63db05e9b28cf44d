"""`tunestack export`: a model (stage output, merged or Hugging Face folder, .gguf, built-in alias) as a GGUF file
with an Ollama Modelfile beside it, or as a standalone sharded safetensors folder.

    tunestack export --model out/sft --format gguf --quantization q8_0 --output_dir out/gguf
    tunestack export --model out/sft --format safetensors --max_shard_size 2GB --output_dir out/hf

Adapters are merged first by the merge command's own checked path (into a temporary folder for GGUF).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.config.merge import MergeArguments
from tunestack.config.model import DTYPES, ModelArguments
from tunestack.data.templates import (
    TOKENIZER_TEMPLATE_NAMES,
    NamedTemplate,
    get_template,
    jinja_chat_template,
)
from tunestack.data.templates import stop_token_ids as template_stop_ids
from tunestack.errors import ConfigError, ModelError
from tunestack.export import gguf_arch, gguf_vocab, gguf_writer, ollama, outputs
from tunestack.export.safetensors import merge_into
from tunestack.infer.decoding import stop_token_ids
from tunestack.locks import WriterLock
from tunestack.model.adapters import adapter_task_type
from tunestack.model.load import load_model, load_tokenizer
from tunestack.model.ref import ModelRef, resolve_model, resolve_stack, training_system_prompt
from tunestack.rundir import LOCK_FILE

logger = logging.getLogger(__name__)

FORMATS = ("gguf", "safetensors")
MODELFILE = "Modelfile"


@dataclass
class ExportArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "The model: a tunestack stage output (its adapter is merged first), a merged or Hugging Face "
            "folder, a .gguf file, or a built-in alias (default: smollm2-135m-instruct)."
        },
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "Same as --model."})
    lora_model: str | None = field(default=None, metadata={"help": "An adapter folder to merge onto --model first."})
    format: str = field(
        default="gguf", metadata={"help": "gguf (llama.cpp, Ollama, LM Studio) or safetensors.", "choices": FORMATS}
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "GGUF tensor type: f32, f16 (default), bf16, q8_0 (8-bit blocks), q4_0 (4-bit blocks). K-quants "
            "(q4_k_m ...) come from llama.cpp's llama-quantize run on the f16 file."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder for the .gguf + Modelfile, or the model."})
    gguf_name: str | None = field(
        default=None, metadata={"help": "File name stem of the .gguf (default: the model folder's name)."}
    )
    template_name: str | None = field(
        default=None, metadata={"help": "Chat template (default: the tokenizer's own, i.e. the one training used)."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "SYSTEM of the Modelfile (default: the system prompt of training, else the template's)."},
    )
    modelfile: bool = field(default=True, metadata={"help": "Write an Ollama Modelfile beside the .gguf."})
    max_shard_size: str = field(default="2GB", metadata={"help": "safetensors: the largest shard, e.g. 2GB, 500MB."})
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "safetensors: dtype of the saved weights (auto: the base checkpoint's).", "choices": DTYPES},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "safetensors: replace a non-empty --output_dir (as tunestack merge)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model folder's own Python code."})

    @property
    def reference(self) -> str | None:
        return self.model or self.model_name_or_path

    @property
    def stem(self) -> str:
        if self.gguf_name:
            return self.gguf_name.removesuffix(".gguf")
        name = Path(self.lora_model or self.reference or "smollm2-135m-instruct").expanduser()
        name = name.resolve() if name.exists() else name  # "." and "out/sft/" name their folder
        stem = name.stem if name.suffix.lower() == ".gguf" else name.name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"

    def gguf_file(self, quantization: str) -> str:
        return f"{self.stem}-{quantization}.gguf"

    def problems(self) -> list[str]:
        out = []
        if self.model and self.model_name_or_path and self.model != self.model_name_or_path:
            out.append("--model and --model_name_or_path name the same thing; give one of them")
        if not self.output_dir:
            out.append("--output_dir is required")
        if self.format == "gguf":
            hint = str(Path(self.output_dir or ".") / self.gguf_file("f16"))
            try:
                gguf_writer.check_quantization(self.quantization or "f16", hint)
            except ConfigError as exc:
                out += exc.problems
        elif self.quantization:
            out.append("--quantization applies to --format gguf; a safetensors export keeps --torch_dtype")
        out += MergeArguments(lora_model="-", max_shard_size=self.max_shard_size).problems()  # merge's size check
        return out


# ---------------------------------------------------------------------------------------------
# GGUF


def _config_of(ref: ModelRef, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
    return AutoConfig.from_pretrained(
        ref.base_dir, trust_remote_code=trust_remote_code, local_files_only=True, **kwargs
    )


def _required_keys(arch: str, vocab: gguf_vocab.VocabSpec) -> list[str]:
    keys = ["general.architecture", "general.file_type", "general.quantization_version"]
    keys += [
        f"{arch}.{k}"
        for k in (
            "context_length",
            "embedding_length",
            "block_count",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.layer_norm_rms_epsilon",
            "rope.freq_base",
            "vocab_size",
        )
    ]
    keys += [f"tokenizer.ggml.{k}" for k in ("model", "tokens", "token_type", "bos_token_id", "eos_token_id")]
    keys += ["tokenizer.ggml.pre", "tokenizer.ggml.merges"] if vocab.model == "gpt2" else ["tokenizer.ggml.scores"]
    return keys


def _chat_template(args: ExportArguments, tokenizer: Any) -> tuple[Any, NamedTemplate | None]:
    """The template training used (--template_name, else the tokenizer's own; None for a model without one) and
    the named template the Modelfile renders it with."""
    template = None
    if args.template_name not in TOKENIZER_TEMPLATE_NAMES or getattr(tokenizer, "chat_template", None):
        template = get_template(args.template_name, tokenizer)
    else:
        logger.warning("the tokenizer has no chat template: the GGUF gets none and the Modelfile passes prompts raw")
    fitted = ollama.fit_named_template(template, tokenizer) if template is not None and args.modelfile else None
    return template, fitted


def _modelfile(
    args: ExportArguments, gguf_name: str, source: ModelRef, tokenizer: Any, fitted: Any, stops: list[int], bos: bool
) -> str:
    system = args.system_prompt if args.system_prompt is not None else training_system_prompt(source)
    if system is None and fitted is not None:
        system = fitted.default_system
    if fitted is None:
        return ollama.modelfile_text(gguf_name, None, system or None, [tokenizer.decode([i]) for i in stops])
    text = ollama.go_template(fitted, tokenizer, runtime_adds_bos=bos)
    return ollama.modelfile_text(gguf_name, text, system or None, ollama.stop_strings(tokenizer, stops, fitted))


def export_gguf(args: ExportArguments) -> dict[str, Any]:
    output = Path(args.output_dir or "").expanduser()
    lock = WriterLock(output.with_name(f".{output.name}{LOCK_FILE}"), output).acquire()  # one export at a time
    try:
        return _export_gguf(args, output)
    finally:
        lock.release()


def _export_gguf(args: ExportArguments, output: Path) -> dict[str, Any]:
    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every step at INFO
    started = time.time()
    quantization = (args.quantization or "f16").strip().lower()
    name = args.gguf_file(quantization)
    outputs.check_replaceable(output, [name] + ([MODELFILE] if args.modelfile else []))
    ref = resolve_stack(args.reference, args.lora_model)
    if ref.adapters and adapter_task_type(ref.adapters[-1]) == "SEQ_CLS":
        raise ModelError(
            f"{ref.adapters[-1]} is a reward model adapter, which has no GGUF form; use --format safetensors"
        )
    config = _config_of(ref, args.trust_remote_code)
    arch = gguf_arch.architecture_of(config)  # refuse what cannot be written before any merge or load
    gguf_arch.rope_of(config)
    tokenizer = load_tokenizer(ref, None, args.trust_remote_code)  # the one a merge saves with the merged model
    template, fitted = _chat_template(args, tokenizer)
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch_dir = tempfile.TemporaryDirectory(prefix=".export-merge-", dir=output.parent) if ref.adapters else None
    created = not output.exists()
    tmp_gguf, tmp_modelfile = outputs.temporary_path(output, name), outputs.temporary_path(output, MODELFILE)
    try:
        source = ref
        if scratch_dir is not None:
            logger.info("merging %s into its base first (tunestack merge, float32, checked)", ref.adapters[-1])
            merged = merge_into(Path(scratch_dir.name) / "merged", args.reference, args.lora_model,
                                torch_dtype="float32", max_shard_size="1000GB", overwrite=False,
                                trust_remote_code=args.trust_remote_code)  # fmt: skip
            source = resolve_model(str(merged.output_dir))
        model = load_model(source, ModelArguments(torch_dtype="float32", trust_remote_code=args.trust_remote_code),
                           tokenizer=tokenizer).eval()  # fmt: skip
        extra = template_stop_ids(template, tokenizer) if isinstance(template, NamedTemplate) else []
        stops = stop_token_ids(source, model, tokenizer, extra)
        n_vocab = int(model.get_input_embeddings().weight.shape[0])
        vocab = gguf_vocab.vocab_spec(tokenizer, n_vocab, stops)
        planned = gguf_writer.plan(gguf_arch.model_tensors(model, arch), quantization)
        arch_name = gguf_arch.gguf_arch_name(arch)

        def metadata(writer: Any) -> None:
            writer.add_type("model")
            writer.add_name(args.stem)
            gguf_arch.write_hyperparameters(writer, model.config, arch)
            writer.add_file_type(gguf_writer.file_type(quantization))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            gguf_vocab.write_vocab(writer, vocab, jinja_chat_template(template) if template is not None else None)

        output.mkdir(exist_ok=True)
        written = gguf_writer.write_gguf(tmp_gguf, arch_name, metadata, planned, label=name)
        check = gguf_writer.read_back(written, _required_keys(arch_name, vocab))
        files = {name: (tmp_gguf, {"format": "gguf", "quantization": quantization, "source": str(ref.reference)})}
        if args.modelfile:
            text = _modelfile(args, name, source, tokenizer, fitted, stops, vocab.add_bos)
            tmp_modelfile.write_text(text, encoding="utf-8")
            files[MODELFILE] = (tmp_modelfile, {"format": "modelfile", "gguf": name})
        outputs.commit(output, files)
    finally:
        for tmp in (tmp_gguf, tmp_modelfile):
            tmp.unlink(missing_ok=True)
        if scratch_dir is not None:
            scratch_dir.cleanup()
        if created and output.is_dir() and not any(output.iterdir()):
            output.rmdir()
    return {
        "path": output / name,
        "bytes": (output / name).stat().st_size,
        "types": written.type_counts(),
        "tensors": check["tensors"],
        "quantization": quantization,
        "modelfile": output / MODELFILE if args.modelfile else None,
        "template": getattr(fitted, "name", None),
        "merged": scratch_dir is not None,
        "seconds": round(time.time() - started, 1),
    }


def gguf_summary(result: dict[str, Any]) -> str:
    types = ", ".join(f"{n} {t}" for t, n in sorted(result["types"].items()))
    lines = [
        f"wrote {result['path']} ({result['quantization']}: {types}; {result['bytes'] / 1e6:.1f} MB) "
        f"in {result['seconds']:.0f}s{' after merging the adapter' if result['merged'] else ''}",
        f"  read back: {result['tensors']} tensors (names, shapes, types, bytes) and metadata: ok",
    ]
    if result["modelfile"]:
        template = f" (chat template: {result['template']})" if result["template"] else " (no chat template)"
        lines.append(f"  Modelfile: {result['modelfile']}{template}")
        lines.append(f"  run it: ollama create NAME -f {result['modelfile']}   or   llama-cli -m {result['path']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# safetensors


def export_safetensors(args: ExportArguments) -> str:
    from tunestack.model import merge as merge_command

    result = merge_into(
        Path(args.output_dir or "").expanduser(),
        args.reference,
        args.lora_model,
        torch_dtype=args.torch_dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite_output_dir,
        trust_remote_code=args.trust_remote_code,
    )
    return merge_command.summary(result)


def main(argv: list[str]) -> int:
    from tunestack.config.parse import parse_into

    (args,) = parse_into(
        (ExportArguments,),
        argv,
        prog="tunestack export",
        description="Export a model as GGUF (+ Ollama Modelfile) or as a standalone sharded safetensors folder.",
    )
    if args.format == "gguf":
        print(gguf_summary(export_gguf(args)))  # noqa: T201
    else:
        print(export_safetensors(args))  # noqa: T201
    return 0
