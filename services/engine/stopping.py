"""When a sequence stops: EOS, a stop token id, a stop string, or max_tokens."""

from __future__ import annotations

from proto.messages import FinishReason, SamplingParams
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class StopChecker:
    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: list[int],
        tokenizer: Tokenizer | None,
        previous_ids: list[int] | None = None,
    ):
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.stop_ids = set(params.stop_token_ids)
        self.text = ""
        self.detokenizer: IncrementalDetokenizer | None = None
        if params.stop:
            if tokenizer is None:
                raise ValueError("stop strings need the model's tokenizer")
            self.detokenizer = IncrementalDetokenizer(tokenizer)
            if previous_ids:
                self.text = self.detokenizer.feed(previous_ids)

    def check(self, token_id: int, generated: int) -> tuple[FinishReason | None, str | int | None]:
        if token_id in self.eos:
            return "stop", None
        if token_id in self.stop_ids:
            return "stop", token_id
        if self.detokenizer is not None:
            self.text += self.detokenizer.feed([token_id])
            # Only the tail that the new text can complete needs searching.
            for stop in self.params.stop:
                if stop in self.text:
                    return "stop", stop
            self.text = self.text[-max(len(s) for s in self.params.stop) :]
        if generated >= self.params.max_tokens:
            return "length", None
        return None, None
