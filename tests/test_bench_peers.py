"""The peer benchmark's parts, really run: exact-length text prompts from the real tokenizer,
and both load generators (hetserve's and vLLM's own `vllm bench serve`) on the same prompts
against a real hetserve system and a real `transformers serve`, which refuses a field vLLM's
client sends and ends its streams without [DONE]."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from services.backends.vllm.engine_args import vllm_missing_reason
from services.bench.peers import Peer, serving, vllm_bench_serve
from services.bench.serve import BenchConfig, run_benchmark
from services.bench.text_prompts import exact_prompts, write_dataset

ROOT = Path(__file__).resolve().parents[1]
REQUESTS, OUTPUT_TOKENS, PROMPT_TOKENS = 4, 6, 24


def test_prompts_have_exactly_the_asked_token_count(smollm2: dict[str, Path]) -> None:
    tokenizer = Tokenizer.from_file(str(smollm2["float32"] / "tokenizer.json"))
    prompts = exact_prompts(tokenizer, 20, 128, seed=3)
    assert len(set(prompts)) == 20
    assert {len(tokenizer.encode(p, add_special_tokens=False).ids) for p in prompts} == {128}
    assert exact_prompts(tokenizer, 20, 128, seed=3) == prompts  # seeded


@pytest.mark.slow
@pytest.mark.skipif(
    vllm_missing_reason() is not None,
    reason=f"the vllm extra (vLLM's load generator) is not installed: {vllm_missing_reason()}",
)
@pytest.mark.parametrize(
    "peer",
    [
        Peer("hetserve native", "hetserve", ROOT / "scripts/topologies/all-native-converted.yaml"),
        Peer("transformers serve", "hf"),
    ],
    ids=lambda p: p.kind,
)
def test_both_generators_load_a_real_server_with_the_same_prompts(
    peer: Peer, smollm2: dict[str, Path], tmp_path: Path
) -> None:
    model = smollm2["float32"]
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    prompts = exact_prompts(tokenizer, REQUESTS + 1, PROMPT_TOKENS, seed=1)
    dataset = write_dataset(tmp_path / "prompts.jsonl", prompts, OUTPUT_TOKENS)
    with serving(peer, model, tmp_path) as endpoint:
        ours = asyncio.run(
            run_benchmark(
                BenchConfig(
                    base_url=endpoint.base_url,
                    num_requests=REQUESTS,
                    concurrency=2,
                    model=endpoint.model,
                    endpoint="completions",
                    dataset=str(dataset),
                    output_tokens=f"fixed:{OUTPUT_TOKENS}",
                    vllm_extras=False,
                    timeout=120,
                )  # fmt: skip
            )
        )
        theirs = vllm_bench_serve(
            endpoint, peer, dataset, OUTPUT_TOKENS, REQUESTS, concurrency=2, rate=None,
            result=tmp_path / "vllm.json", tokenizer=model,
        )  # fmt: skip
    s = ours.summary
    assert (s.requests_ok, s.requests_failed) == (REQUESTS, 0), s.errors
    assert s.output_tokens == REQUESTS * OUTPUT_TOKENS  # word prompts: no early EOS
    assert (theirs["completed"], theirs["failed"]) == (REQUESTS, 0)
    assert theirs["total_input_tokens"] == REQUESTS * PROMPT_TOKENS  # its tokenizer agrees
    assert theirs["median_tpot_ms"] > 0 and theirs["median_ttft_ms"] > 0
