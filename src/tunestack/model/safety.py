"""What a model folder may make tunestack do: no pickled weights unless asked (a pickle runs code when it is
loaded), and a clear line naming whose code runs when remote code is allowed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tunestack.errors import ModelError

logger = logging.getLogger("tunestack")

# The pickled files a loader would read when the folder has no safetensors equivalent.
_PICKLED = {
    "model": ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt"),
    "adapter": ("adapter_model.bin",),
}
_announced: set[Path] = set()


def pickled_weights(folder: Path) -> list[Path]:
    """The pickled weight files that loading `folder` would unpickle (none when safetensors stand beside them)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        if (folder / "adapter_model.safetensors").exists():
            return []
        return sorted(p for pattern in _PICKLED["adapter"] for p in folder.glob(pattern))
    if any(folder.glob("*.safetensors")):
        return []
    return sorted(p for pattern in _PICKLED["model"] for p in folder.glob(pattern))


def refuse_pickled_weights(folders: Iterable[Path], allow_pickle: bool) -> None:
    """ModelError naming the first pickled weight file, unless --allow_pickle (then torch's weights_only loader,
    which the libraries use, refuses anything but tensors)."""
    for folder in folders:
        found = pickled_weights(folder)
        if found and not allow_pickle:
            raise ModelError(
                f"{found[0]}: pickled weights can run code when they are loaded; convert them to safetensors, "
                "or pass --allow_pickle true to load them with torch's weights_only loader"
            )
        if found:
            logger.warning("loading pickled weights %s with weights_only (--allow_pickle true)", found[0])


def announce_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """With --trust_remote_code, say once per folder whose Python code is about to run."""
    folder = Path(folder).resolve()
    if not trust_remote_code or folder in _announced:
        return
    _announced.add(folder)
    code = sorted(p.name for p in folder.glob("*.py"))
    if code:
        logger.warning("--trust_remote_code: running the code of %s (%s)", folder, ", ".join(code))


def needs_remote_code(folder: Path, error: BaseException) -> ModelError | None:
    """The one-line error for a folder whose own code transformers refused to run without --trust_remote_code."""
    if "custom code" not in str(error) and "trust_remote_code" not in str(error):
        return None
    code = sorted(p.name for p in Path(folder).glob("*.py"))
    named = f" ({', '.join(code)})" if code else ""
    return ModelError(
        f"{folder} loads through its own Python code{named}; read it, then pass --trust_remote_code true to run it"
    )
