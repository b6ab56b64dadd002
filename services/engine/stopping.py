"""When a sequence stops: EOS, a stop token id, a stop string, or max_tokens.

Stop strings are found by the gateway's own algorithm (services/hf/text_stream.py) over the
same text: the detokenizer starts from the prompt and every generated token is fed in order,
so the engine and the gateway agree on where a stop string ends the completion.
"""

from __future__ import annotations

from collections.abc import Sequence

from proto.messages import FinishReason, SamplingParams
from services.hf.text_stream import IncrementalDetokenizer, StopStringMatcher
from services.hf.tokenizer import Tokenizer


class StopChecker:
    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: list[int],
        tokenizer: Tokenizer | None,
        prompt_ids: Sequence[int] = (),
        previous_ids: Sequence[int] = (),
    ):
        """`previous_ids`: completion tokens an earlier attempt produced (already checked)."""
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.stop_ids = set(params.stop_token_ids)
        self.detokenizer: IncrementalDetokenizer | None = None
        self.matcher: StopStringMatcher | None = None
        if params.stop:
            if tokenizer is None:
                raise ValueError("stop strings need the model's tokenizer")
            self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
            self.matcher = StopStringMatcher(params.stop)
            for token_id in previous_ids:
                self.matcher.feed(self.detokenizer.feed([token_id]))

    def check(self, token_id: int, generated: int) -> tuple[FinishReason | None, str | int | None]:
        if token_id in self.eos:
            return "stop", None
        if token_id in self.stop_ids:
            return "stop", token_id
        if self.matcher is not None and self.detokenizer is not None:
            match = self.matcher.feed(self.detokenizer.feed([token_id]))
            if match.stop is not None:
                return "stop", match.stop
        if generated >= self.params.max_tokens:
            return "length", None
        return None, None
