"""vLLM's own greedy output, colocated (no disaggregation, no connector), in a process of its
own (one vLLM engine per process): `python -m tests.vllm_colocated MODEL N < prompts.json`
prints one token list per prompt as JSON."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    model, max_tokens = sys.argv[1], int(sys.argv[2])
    prompts = json.load(sys.stdin)
    llm = LLM(
        model=model,
        dtype="float32",
        block_size=32,
        max_model_len=512,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    print(json.dumps([list(o.outputs[0].token_ids) for o in outputs]))


if __name__ == "__main__":
    main()
