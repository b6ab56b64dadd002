"""Workloads whose prompts share KV: every prompt begins with the same prefix (a system prompt),
and conversations of several turns, where turn k's prompt is the whole conversation so far
(the prefix, every earlier user turn and answer) plus a new user turn.

Token-id prompts on /v1/completions only: the next turn needs the previous answer's exact ids
(vLLM's `return_token_ids`, which hetserve implements).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from services.bench.client import RequestResult
from services.bench.distributions import LengthDistribution
from services.bench.workload import BenchRequest, random_token_prompts

Send = Callable[[BenchRequest], Awaitable[RequestResult]]


@dataclass(frozen=True)
class Conversation:
    user_turns: list[list[int]]  # the new tokens of each turn (the first starts with the prefix)
    max_tokens: list[int]


def conversations(
    rng: np.random.Generator,
    num_requests: int,
    turns: int,
    shared_prefix: int,
    prompt_dist: LengthDistribution,
    output_dist: LengthDistribution,
    vocab_size: int,
) -> list[Conversation]:
    """ceil(num_requests / turns) conversations; the last may be shorter so that exactly
    num_requests requests are sent. Each user turn's length comes from `prompt_dist`."""
    prefix = random_token_prompts(rng, np.array([shared_prefix]), vocab_size)[0]
    out, left = [], num_requests
    while left > 0:
        count = min(turns, left)
        user = random_token_prompts(rng, prompt_dist.sample(rng, count), vocab_size)
        user[0] = prefix + user[0]
        out.append(Conversation(user, [int(m) for m in output_dist.sample(rng, count)]))
        left -= count
    return out


async def run_conversation(conversation: Conversation, send: Send) -> list[RequestResult]:
    """Every turn in order, each right after the previous answer (a user who replies at once).
    A failed turn ends the conversation: its later turns are reported as failed too."""
    history: list[int] = []
    results: list[RequestResult] = []
    for user, max_tokens in zip(conversation.user_turns, conversation.max_tokens, strict=True):
        prompt = history + user
        result = await send(BenchRequest(prompt, max_tokens, len(prompt)))
        results.append(result)
        if not result.ok:
            break
        if len(result.output_ids) != result.output_tokens:
            result.ok, result.error = False, "the answer's token ids are needed for the next turn"
            break
        history = prompt + result.output_ids
    missing = len(conversation.user_turns) - len(results)
    results += [RequestResult(error="an earlier turn failed") for _ in range(missing)]
    return results


def flatten(per_conversation: Sequence[list[RequestResult]]) -> list[RequestResult]:
    return [r for results in per_conversation for r in results]
