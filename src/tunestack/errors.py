"""User-facing errors.

A `TunestackError` is a problem with the user's input (data, flags, paths): the CLI prints its
message as one line and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TunestackError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(TunestackError):
    """Bad flags or recipe keys. Carries every problem found, not only the first."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(TunestackError):
    """Bad training data; the message names file and line (or byte offset)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            shown = self.problems[:20]
            more = len(self.problems) - len(shown)
            msg = f"{len(self.problems)} bad records:\n  " + "\n  ".join(shown)
            if more:
                msg += f"\n  ... and {more} more"
        super().__init__(msg)


class ModelError(TunestackError):
    """A model reference that cannot be resolved or loaded."""


class TrainingDiverged(TunestackError):
    """The loss became NaN/inf; the last good checkpoint is left intact."""

    exit_code = 1


class DiskFull(TunestackError):
    """A save ran out of disk space; what was being written is discarded, earlier saves are intact."""

    exit_code = 1


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, however the writing library reports it (OSError, or a message from safetensors' Rust writer)."""
    import errno

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text
