"""One request as the engine sees it: its tokens, its blocks, how it samples and stops."""

from __future__ import annotations

from dataclasses import dataclass, field

from proto.messages import FinishReason, GenerateRequest, SamplingParams
from services.engine.sampling import Sampler
from services.engine.stopping import StopChecker
from services.hf.tokenizer import Tokenizer


@dataclass(eq=False)  # one sequence is one request: compared by identity
class Sequence:
    request_id: str
    context_ids: list[int]  # prompt, plus tokens an earlier attempt produced
    params: SamplingParams
    sampler: Sampler | None  # None where the engine samples itself (vLLM)
    stopper: StopChecker
    completion_offset: int = 0  # completion tokens produced before this attempt
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV is in the cache
    num_cached: int = 0  # of those, prompt tokens found in the prefix cache
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @classmethod
    def from_request(
        cls,
        request: GenerateRequest,
        eos_token_ids: list[int],
        tokenizer: Tokenizer | None,
        sampler: Sampler | None,
    ) -> Sequence:
        """A request as an engine tracks it: its tokens, how it samples and when it stops."""
        return cls(
            request_id=request.request_id,
            context_ids=request.context_token_ids,
            params=request.sampling,
            sampler=sampler,
            stopper=StopChecker(
                request.sampling,
                eos_token_ids,
                tokenizer,
                prompt_ids=request.prompt_token_ids,
                previous_ids=request.resumed_token_ids,
            ),
            completion_offset=len(request.resumed_token_ids),
        )

    @property
    def all_ids(self) -> list[int]:
        return self.context_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.context_ids[-1]

    @property
    def prefilled(self) -> bool:
        """Every context token's KV is in the cache."""
        return self.num_computed >= len(self.context_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.context_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> None:
        """Record a sampled token and decide whether the sequence is done."""
        self.output_ids.append(token_id)
        generated = self.completion_offset + len(self.output_ids)
        self.finish_reason, self.stop_reason = self.stopper.check(token_id, generated)
