"""Time the native engine's decode step (and one prefill) at several batch sizes, for the
engine code of a given source tree: run it on two trees, alternately, to compare them.

    python scripts/bench_decode_step.py --tree . --model models/tiny-llama [--batches 1,8,32]

Prints one JSON line: median step seconds per batch size (50 steps after 5 warm-up steps,
every sequence 64 prompt tokens), and prefill seconds of a 256-token prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", type=Path, required=True, help="source tree to import from")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    import torch

    from proto.messages import GenerateRequest, SamplingParams
    from services.engine.engine import NativeEngine

    torch.set_num_threads(args.threads)
    engine = NativeEngine(args.model, "vllm-flash", 16, "float32", 2048, "cpu")
    blocks = getattr(engine, "blocks", None) or engine.allocator  # before: an allocator
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    result: dict[str, float] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        seqs = []
        for i in range(batch):
            request = GenerateRequest(
                request_id=f"b{batch}-{i}",
                prompt_token_ids=[(7 * i + t) % 900 + 5 for t in range(64)],
                sampling=params,
            )
            seq = engine.new_sequence(request)
            seq.block_table = blocks.allocate(engine.blocks_for(64 + args.steps + 8))
            engine.prefill(seq)
            seqs.append(seq)
        times = []
        for step in range(args.steps + 5):
            start = time.perf_counter()
            engine.decode(seqs)
            if step >= 5:
                times.append(time.perf_counter() - start)
        result[f"decode_step_s_batch{batch}"] = statistics.median(times)
        for seq in seqs:
            blocks.free(seq.block_table)
    request = GenerateRequest(request_id="p", prompt_token_ids=list(range(5, 261)), sampling=params)
    prefill = []
    for _ in range(5):
        seq = engine.new_sequence(request)
        seq.block_table = blocks.allocate(engine.blocks_for(256))
        start = time.perf_counter()
        engine.prefill(seq)
        prefill.append(time.perf_counter() - start)
        blocks.free(seq.block_table)
    result["prefill_s_256"] = statistics.median(prefill)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
