"""vLLM on its own, colocated (no hetserve, no disaggregation): the same-run baseline for
hetserve's vLLM instances. Its async engine, one request at a time, streamed token by token.

    python scripts/bench_vllm_alone.py MODEL THREADS OUTPUT_TOKENS < prompt_lengths.json

Prints {"ttft_ms_p50", "tpot_ms_p50"} as JSON on its last line. Own process: one vLLM engine
per process.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time


async def measure(model: str, lengths: list[int], output_tokens: int) -> dict[str, float]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=model,
            dtype="float32",
            block_size=32,
            max_model_len=1024,
            kv_cache_memory_bytes=256 << 20,
            enforce_eager=True,
            enable_prefix_caching=False,
        )
    )
    params = SamplingParams(
        max_tokens=output_tokens,
        temperature=0,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )
    ttft, tpot = [], []
    try:
        for i, length in enumerate(lengths):
            prompt = [10 + (7 * i + 13 * t) % 1000 for t in range(length)]
            start, first, count = time.perf_counter(), None, 0
            async for out in engine.generate(
                {"prompt_token_ids": prompt}, params, request_id=str(i)
            ):
                count += len(out.outputs[0].token_ids)
                first = first or time.perf_counter()
            ttft.append(first - start)
            tpot.append((time.perf_counter() - first) / max(1, count - 1))
    finally:
        engine.shutdown()
    return {
        "ttft_ms_p50": statistics.median(ttft) * 1e3,
        "tpot_ms_p50": statistics.median(tpot) * 1e3,
    }


def main() -> None:
    model, threads, output_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if threads != "0":  # as hetserve up runs its vLLM instances (backends/vllm/engine_args.py)
        os.environ["OMP_NUM_THREADS"] = threads
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    lengths = json.load(sys.stdin)
    print(json.dumps(asyncio.run(measure(model, lengths, output_tokens))))


if __name__ == "__main__":
    main()
