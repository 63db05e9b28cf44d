"""Write a GGUF file with the gguf package and check it by reading it back.

Tensor types follow llama.cpp's converter: 1-D tensors (norms, biases) and `rope_freqs` stay F32; the block
quantizations (Q8_0, Q4_0) need the row length divisible by their block of 32, and a tensor whose rows are not
stays F16. Q4_0 keeps the output layer (the token embedding when the two are tied) at Q8_0, as llama.cpp's
quantizer keeps it above the rest. Tensors are converted and quantized one at a time while the file is written, so
memory holds the model plus one tensor. The file is written under a temporary name; `read_back` then checks every
tensor (name, shape, type, and a hash of its bytes) and the metadata before the caller renames it into place.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunestack.errors import ConfigError, TunestackError
from tunestack.export.gguf_arch import SourceTensor

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q4_0")
# Types llama.cpp's own quantizer (llama-quantize) makes from an f16 file: k-quants, i-quants and the rest.
LLAMA_QUANTIZE_ONLY = (
    "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
    "q4_1", "q5_0", "q5_1", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs",
    "iq3_s", "iq3_m", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0",
)  # fmt: skip
BLOCK_ROWS = 32  # Q8_0 and Q4_0 quantize blocks of 32 values along a row


class ReadBackError(TunestackError):
    """The written file does not hold what was written; it is deleted."""

    exit_code = 1


def check_quantization(name: str, f16_path: str) -> str:
    """The normalised quantization name; ConfigError (exit 2) for anything else, naming the llama-quantize command
    for the types llama.cpp's quantizer makes (`f16_path`: where the f16 export of this model goes)."""
    q = name.strip().lower()
    if q in QUANTIZATIONS:
        return q
    if q in LLAMA_QUANTIZE_ONLY:
        target = f16_path.removesuffix("-f16.gguf") + f"-{q}.gguf"
        raise ConfigError(
            f"--quantization {name}: tunestack writes {', '.join(QUANTIZATIONS)}; {q.upper()} comes from llama.cpp's "
            f"quantizer: export --quantization f16, then run: llama-quantize {f16_path} {target} {q.upper()}"
        )
    raise ConfigError(f"--quantization {name}: expected one of {', '.join(QUANTIZATIONS)}")


def _types() -> dict[str, Any]:
    import gguf

    T = gguf.GGMLQuantizationType
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}


def file_type(quantization: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
    }[quantization]


def tensor_type(name: str, shape: tuple[int, ...], quantization: str, output_name: str) -> Any:
    """The GGML type of one tensor under `quantization` (see the module docstring)."""
    types = _types()
    T = type(types["f32"])
    if len(shape) <= 1 or name.startswith("rope_freqs"):
        return T.F32
    wanted = types[quantization]
    if quantization == "q4_0" and name == output_name:
        wanted = T.Q8_0
    if wanted in (T.Q8_0, T.Q4_0) and shape[-1] % BLOCK_ROWS:
        return T.F16
    return wanted


@dataclass
class PlannedTensor:
    source: SourceTensor
    qtype: Any
    nbytes: int
    sha256: str = ""


@dataclass
class WrittenFile:
    path: Path
    tensors: list[PlannedTensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        return counts


def plan(tensors: list[SourceTensor], quantization: str) -> list[PlannedTensor]:
    import gguf

    names = {t.name for t in tensors}
    output_name = "output.weight" if "output.weight" in names else "token_embd.weight"
    out = []
    for t in tensors:
        qtype = tensor_type(t.name, t.shape, quantization, output_name)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(t.shape[:-1], dtype=np.int64)) * (t.shape[-1] // block) * size
        out.append(PlannedTensor(t, qtype, nbytes))
    return out


def _encode(values: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    return np.ascontiguousarray(gguf.quants.quantize(values, qtype))


def write_gguf(
    path: Path,
    arch_name: str,
    add_metadata: Any,
    planned: list[PlannedTensor],
    progress: bool = True,
    label: str | None = None,
) -> WrittenFile:
    """Write `path`: the metadata `add_metadata(writer)` adds, then every planned tensor, encoded one at a time."""
    import gguf
    from tqdm.auto import tqdm

    writer = gguf.GGUFWriter(path, arch_name)
    try:
        add_metadata(writer)
        metadata = {key: v.value for shard in writer.kv_data for key, v in shard.items()}
        for p in planned:
            dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
                p.qtype, np.uint8
            )
            shape = p.source.shape if dtype is not np.uint8 else gguf.quant_shape_to_byte_shape(p.source.shape, p.qtype)
            writer.add_tensor_info(p.source.name, shape, np.dtype(dtype), p.nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(p.nbytes for p in planned)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"writing {label or path.name}", disable=not progress
        ) as bar:
            for p in planned:
                data = _encode(p.source.values(), p.qtype)
                if data.nbytes != p.nbytes:
                    raise AssertionError(f"{p.source.name}: encoded {data.nbytes} bytes, planned {p.nbytes}")
                p.sha256 = hashlib.sha256(data.view(np.uint8).reshape(-1)).hexdigest()
                writer.write_tensor_data(data)
                bar.update(p.nbytes)
    finally:
        writer.close()
    return WrittenFile(path, planned, metadata)


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, (list, tuple)):
        if not isinstance(got, list) or len(got) != len(want):
            return False
        if want and isinstance(want[0], (int, float)) and not isinstance(want[0], bool):
            return bool(np.allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), rtol=1e-6))
        return list(got) == list(want)
    if isinstance(want, float):
        return bool(np.isclose(float(got), want, rtol=1e-6))
    return got == want


def read_back(written: WrittenFile, required: list[str]) -> dict[str, Any]:
    """Read the file with gguf.GGUFReader: every tensor with its shape, type and bytes, every metadata value that
    was written, and the `required` keys. Raises ReadBackError; returns a summary."""
    import gguf

    try:
        reader = gguf.GGUFReader(written.path)
    except Exception as exc:  # a truncated or corrupt file raises whatever numpy / struct raise
        raise ReadBackError(f"{written.path}: the written file cannot be read back ({exc})") from None
    problems: list[str] = []
    found = {t.name: t for t in reader.tensors}
    for p in written.tensors:
        t = found.pop(p.source.name, None)
        if t is None:
            problems.append(f"tensor {p.source.name} is missing")
            continue
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if shape != tuple(p.source.shape):
            problems.append(f"tensor {p.source.name} has shape {shape}, expected {p.source.shape}")
        if t.tensor_type != p.qtype:
            problems.append(f"tensor {p.source.name} is {t.tensor_type.name}, expected {p.qtype.name}")
        digest = hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)).hexdigest()
        if digest != p.sha256:
            problems.append(f"tensor {p.source.name}: its bytes differ from what was written")
    problems += [f"unexpected tensor {name}" for name in found]
    problems += [f"required metadata {key} was not written" for key in required if key not in written.metadata]
    for key, want in written.metadata.items():
        field = reader.fields.get(key)
        if field is None:
            problems.append(f"metadata {key} is missing")
        elif not _same(field.contents(), want):
            problems.append(f"metadata {key} does not read back as written ({str(field.contents())[:60]!r})")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ReadBackError(f"{written.path}: read-back check failed: {shown}")
    return {"tensors": len(written.tensors), "metadata_keys": len(reader.fields)}
