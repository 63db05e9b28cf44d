"""Token ids -> answer text, piece by piece, exactly as `ChatModel.decode` gives the whole answer.

The streamed pieces joined equal the final text: leading whitespace is dropped, trailing whitespace is held
back until something follows it, a piece that ends inside a multi-byte character waits for its end, and text
that could be the start of a stop string waits until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextAssembler:
    """Feed it the tokens of one answer as they come; it returns the new text to send and whether to stop."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []  # tokens generated so far, the stop token included
        self.sent = ""  # text handed out so far
        self.stopped: str | None = None  # "stop" once a stop token or stop string ended the answer

    @property
    def text(self) -> str:
        """The whole answer so far as `ChatModel.decode` makes it (stripped, cut at the first stop)."""
        return self._full()[0].strip()

    def _full(self) -> tuple[str, bool]:
        end = next((i for i, t in enumerate(self.ids) if t in self.stop_ids), None)
        text = self.tokenizer.decode(self.ids[:end], skip_special_tokens=True)
        hit = end is not None
        for stop in self.stop_strings:
            if stop in text:
                text, hit = text.split(stop, 1)[0], True
        return text, hit

    def feed(self, new_ids: Sequence[int]) -> str:
        """Take new tokens; return the text that may be sent now."""
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in new_ids)
        text, hit = self._full()
        text = text.lstrip()
        if hit:
            self.stopped = "stop"
            return self._advance(text.rstrip())
        safe = text.rstrip()
        if safe.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the rest of the character
            safe = safe.rstrip("\ufffd")
        for stop in self.stop_strings:  # hold back a tail that may grow into a stop string
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = safe[: max(0, min(len(safe), len(text) - k))]
                    break
        return self._advance(safe)

    def finish(self) -> str:
        """The answer ended (stop token, length, cancel): the text still held back, except trailing whitespace."""
        return self._advance(self.text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
