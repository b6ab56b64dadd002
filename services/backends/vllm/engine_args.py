"""vLLM behind a hetserve instance: its engine arguments, sampling parameters and the facts
an instance announces (the descriptor vLLM's workers read from their real caches).

One vLLM engine per OS process, always: vLLM keeps the worker-side KV connector in a
process global, so a second engine in the same process would load into the first one's
cache. `hetserve up` gives every instance its own process.
"""

from __future__ import annotations

import os
from typing import Any

from proto.kv_descriptor import KVDescriptor
from proto.messages import GenerateRequest, SamplingParams
from services.backends.vllm import platform_rules
from services.common.settings import WorkerSettings
from services.engine.sequence import Sequence
from services.hf.config import ModelConfig, load_model_config
from services.hf.tokenizer import Tokenizer
from services.kv.dtypes import DTYPES

CONNECTOR = "HetserveConnector"
CONNECTOR_MODULE = "services.backends.vllm.connector"
WORKER_EXTENSION = "services.backends.vllm.connector.HetserveWorkerExtension"
# vllm_kv_cache_gib unset: at least this much, and room for one max_model_len sequence with
# this margin (vLLM refuses to start when one sequence of max_model_len does not fit).
MIN_KV_CACHE_GIB = 0.25
KV_CACHE_MARGIN = 1.25


def vllm_missing_reason() -> str | None:
    """None when vLLM imports; else why not (the `vllm` extra is not installed)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"vLLM is not installed (pip install -e .[vllm]): {exc}"
    return None


def check_model(settings: WorkerSettings) -> ModelConfig:
    """What vLLM would only find out at the first request, refused at start-up instead
    (platform_rules.py: the same rules `hetserve check` applies before anything starts)."""
    cfg = load_model_config(settings.model)
    refused = platform_rules.refusals(
        platform_rules.current_platform(),
        head_dim=cfg.head_dim,
        block_size=settings.block_size,
        dtype=settings.kv_dtype,
    )
    if refused:
        raise ValueError("; ".join(r.reason for r in refused))
    return cfg


def kv_cache_bytes(settings: WorkerSettings, cfg: ModelConfig) -> int | None:
    """vLLM's kv_cache_memory_bytes (per worker); None lets gpu_memory_utilization size it."""
    gib = settings.vllm_kv_cache_gib
    if gib is not None:
        return int(gib * 2**30) if gib else None
    max_len = settings.max_model_len or cfg.max_position_embeddings
    # a dtype name only vLLM knows ("auto", "half") is counted as 4 bytes: too much, not too little
    itemsize = DTYPES.get(settings.kv_dtype, DTYPES["float32"]).itemsize
    per_token = cfg.num_layers * 2 * cfg.kv_size * itemsize
    return max(int(MIN_KV_CACHE_GIB * 2**30), int(max_len * per_token * KV_CACHE_MARGIN))


def engine_args(settings: WorkerSettings, role: str, asynchronous: bool) -> Any:
    """EngineArgs (or AsyncEngineArgs) with hetserve's connector, from an instance's settings."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    cls = AsyncEngineArgs if asynchronous else EngineArgs
    return cls(
        model=settings.model,
        dtype=settings.kv_dtype,
        block_size=settings.block_size,
        max_model_len=settings.max_model_len or None,
        tensor_parallel_size=settings.tp_size,
        distributed_executor_backend="mp" if settings.tp_size > 1 else None,
        kv_cache_memory_bytes=kv_cache_bytes(settings, load_model_config(settings.model)),
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        enforce_eager=settings.vllm_enforce_eager,
        max_num_batched_tokens=settings.vllm_max_num_batched_tokens or None,
        max_num_seqs=settings.max_batch_size,
        # decode must load every prompt token from hetserve: a local prefix hit would too,
        # but then the loaded KV would not be what it computes with
        enable_prefix_caching=settings.vllm_enable_prefix_caching and role == "prefill",
        seed=0,
        disable_log_stats=role == "prefill",  # decode's stats feed its peak-batch logger
        worker_extension_cls=WORKER_EXTENSION,
        kv_transfer_config=KVTransferConfig(
            kv_connector=CONNECTOR,
            kv_connector_module_path=CONNECTOR_MODULE,
            kv_role="kv_both",
            # the workers send KV themselves: they connect to NATS with these settings
            kv_connector_extra_config={
                "owner_pid": os.getpid(),
                "settings": settings.model_dump(mode="json"),
            },
        ),
    )


def apply_threads(settings: WorkerSettings) -> None:
    """`torch_threads` (hetserve up gives every worker 1: they share the machine's cores)
    holds for vLLM too. Its CPU worker would otherwise pin OpenMP threads to every core of the
    node, and their spin-waits then compete with the other services' processes (measured in
    docs/benchmarks.md). Set before the engine starts: its workers inherit the environment."""
    if settings.torch_threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(settings.torch_threads))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def in_process_engine() -> None:
    """The prefill service runs vLLM's engine core in its own process (and its worker, at tp
    1): it steps the engine itself, one step per call, and reaches the workers with
    collective_rpc."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def sampling_params(params: SamplingParams, max_tokens: int, kv: dict[str, Any]) -> Any:
    """vLLM's sampling parameters for hetserve's. hetserve decides when a sequence stops
    (EOS, stop ids and strings, max_tokens: services/engine/stopping.py), so vLLM only
    samples: it ignores EOS and runs to `max_tokens` unless aborted."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        seed=params.seed,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": {"hetserve": kv}},
    )


def rank_descriptors(ranks: list[dict], expected_layout: str) -> list[KVDescriptor]:
    """Every rank's descriptor as its worker read it (collective_rpc results), in rank order;
    rank 0's is the instance's. Checked against what hetserve derives for rank r (the converter
    and direct routes address rank r with tp_rank=r: same heads, same id)."""
    read = sorted((KVDescriptor.model_validate(d) for d in ranks), key=lambda d: d.tp_rank)
    kv = read[0]
    if expected_layout and kv.layout != expected_layout:
        raise ValueError(
            f"the topology says kv_layout {expected_layout}, vLLM's cache is "
            f"{kv.layout}; leave kv_layout empty to accept what vLLM allocates"
        )
    derived = [kv.model_copy(update={"tp_rank": r}) for r in range(kv.tp_size)]
    if read != derived:
        raise ValueError(f"vLLM's ranks hold {read}, hetserve expects {derived}")
    return derived


def new_sequence(request: GenerateRequest, cfg: ModelConfig, tokenizer: Tokenizer) -> Sequence:
    """A request as hetserve tracks it beside vLLM: its tokens and when it stops."""
    return Sequence.from_request(request, cfg.eos_token_ids, tokenizer, sampler=None)
