"""Generated text as it streams: ids -> text deltas, and stop strings found in them.

One algorithm for both places that stop on strings: the engine (services/engine/stopping.py)
and the gateway, which cuts the text it sends before the stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.hf.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Text deltas for ids fed a few at a time; their concatenation is decode(all ids).

    vLLM's scheme: decode a short window of ids twice, without and with the new ones, and
    emit the difference. The window starts a few tokens back so that decoders which treat
    the first token specially (SentencePiece's leading space) see context. Text ending in
    U+FFFD may be a character whose bytes are still arriving, so it is held back.
    """

    # How many prompt tokens the first window reaches back.
    _CONTEXT_TOKENS = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self._prefix_offset = max(len(self.ids) - self._CONTEXT_TOKENS, 0)
        self._read_offset = len(self.ids)

    def _window_texts(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        window = self.ids[self._prefix_offset :]
        prefix = decode(window[: self._read_offset - self._prefix_offset], self._skip_special)
        return prefix, decode(window, self._skip_special)

    def feed(self, ids: Iterable[int]) -> str:
        """Add generated ids; return the text they complete (maybe "")."""
        self.ids.extend(ids)
        prefix, text = self._window_texts()
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back, U+FFFD included."""
        prefix, text = self._window_texts()
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return text[len(prefix) :]


@dataclass(frozen=True)
class StopMatch:
    text: str  # safe to emit now
    stop: str | None = None  # the stop string hit; `text` ends right before it


class StopStringMatcher:
    """Finds stop strings in streamed text, even when one spans several deltas.

    Text that could be the start of a stop string is held back until the next delta shows
    whether it is one. On a hit the output ends before the stop string, as OpenAI's does;
    after it, feed() returns no more text.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(dict.fromkeys(stops))
        if any(not s for s in self.stops):
            raise ValueError("stop strings must not be empty")
        self._held = ""
        self.stopped: str | None = None

    def _holdback(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for n in range(min(longest, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def feed(self, delta: str) -> StopMatch:
        if self.stopped is not None:
            return StopMatch("", self.stopped)
        text = self._held + delta
        hits = [(i + len(s), i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            # The stop string completed first wins; of two ending together, the longer.
            _, index, stop = min(hits)
            self._held, self.stopped = "", stop
            return StopMatch(text[:index], stop)
        keep = self._holdback(text)
        self._held = text[len(text) - keep :]
        return StopMatch(text[: len(text) - keep])

    def flush(self) -> str:
        """At the end of the sequence (no stop string): the text held back."""
        held, self._held = self._held, ""
        return held
