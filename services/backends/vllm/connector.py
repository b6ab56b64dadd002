"""hetserve's KV connector for vLLM (the V1 KV connector API of vLLM 0.32).

vLLM loads it by name: KVTransferConfig(kv_connector="HetserveConnector",
kv_connector_module_path="services.backends.vllm.connector", kv_role="kv_both"). One class
serves both sides; a request's `kv_transfer_params["hetserve"]` says what to do with it:

producer (prefill): {"rid": id, "produce": True, "route": KVRoute}
    Every step that computes prompt tokens of the request, `save_kv_layer` copies the
    request's blocks of that layer out of vLLM's cache (while the next layer computes) and
    hands them, frame-sized, to this rank's KV streams (services/backends/vllm/kv_streams.py),
    which send them to the route's receiver. Token ranges are contiguous and block aligned:
    a chunk that ends inside a block sends its complete blocks only; the last chunk sends up
    to the end of the prompt. The service ends every rank's stream with
    collective_rpc("hetserve_end_streams", ...) once vLLM returned the first token.

consumer (decode): {"rid": id, "staged_blocks": [...], "num_tokens": P}
    The decode service received the KV of the first P prompt tokens into a shared-memory
    staging cache in this cache's own layout (services/backends/vllm/staging.py). The
    scheduler side reports those P tokens as externally computed; the worker side copies
    the staged blocks into the blocks vLLM allocated, before the forward pass. The decode
    prompt is the P tokens plus prefill's first token, so vLLM computes one token's KV.

Scheduler-side methods run in vLLM's engine-core process, worker-side ones in each worker
process: they share only the metadata built here (plain dataclasses, pickled by vLLM).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from proto.kv_descriptor import KVDescriptor
from proto.messages import KVRoute
from services.backends.vllm.kv_streams import KVStreams, StreamEnd
from services.backends.vllm.layout import descriptor_from_cache, physical_layer
from services.backends.vllm.staging import open_staging
from services.common.settings import WorkerSettings
from services.kv.payload import gather_payload, payload_buffer, scatter_payload

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


@dataclass
class SaveSpec:
    rid: str
    route: dict  # KVRoute: where this request's frames go
    num_tokens: int  # of the prompt
    block_ids: list[int]  # the blocks holding tokens [token_start, token_stop)
    token_start: int  # block aligned
    token_stop: int
    opens: bool  # the request's first save: its stream begins here


@dataclass
class LoadSpec:
    rid: str
    staged_blocks: list[int]  # staging blocks, in token order
    block_ids: list[int]  # vLLM's blocks for the same tokens
    skip_blocks: int  # leading blocks vLLM already had (prefix cache)


@dataclass
class HetserveMeta(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)


@dataclass
class _Producing:
    rid: str
    route: dict
    prompt_len: int
    block_ids: list[int]
    sent: int = 0  # tokens sent so far (or that the receiver holds already)
    opened: bool = False  # a save began its stream


def _params(source: Any) -> dict:
    params = getattr(source, "kv_transfer_params", source) or {}
    return params.get("hetserve") or {}


_watching = False


def _exit_with_parent() -> None:
    """In a process vLLM spawned (engine core, worker): stop when its parent is gone. A
    SIGKILLed service would otherwise leave its vLLM processes (and their shared memory)
    behind. SIGTERM first: vLLM's own shutdown releases what it holds."""
    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(15.0)
        os._exit(1)

    threading.Thread(target=watch, name="hetserve-parent-watch", daemon=True).start()


class HetserveConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        if extra.get("owner_pid") not in (None, os.getpid()):
            _exit_with_parent()
        self._block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._producing: dict[str, _Producing] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        self._loaded: set[str] = set()  # loads issued: a preempted request recomputes instead
        # worker side
        self.desc: KVDescriptor | None = None
        self._layers: dict[str, torch.Tensor] = {}  # by layer name, in storage order
        self._layer_index: dict[str, int] = {}
        self._staging = None
        self._streams: KVStreams | None = None
        self._settings = extra.get("settings", {})

    # -- worker side ------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        self._layer_index = {name: extract_layer_index(name) for name in names}
        layer0 = self._vllm_config.compilation_config.static_forward_context[names[0]]
        self.desc = descriptor_from_cache(
            kv_caches[names[0]],
            backend=layer0.attn_backend.get_name(),
            isa=getattr(layer0, "isa", None),
            num_layers=len(names),
            num_kv_heads=self._vllm_config.model_config.get_total_num_kv_heads(),
            tp_size=self._vllm_config.parallel_config.tensor_parallel_size,
            tp_rank=get_tensor_model_parallel_rank(),
        )
        self._layers = {name: physical_layer(kv_caches[name], self.desc.layout) for name in names}

    def attach_staging(self, path_template: str, num_blocks: int) -> None:
        """Map this rank's staging cache: `path_template` with {rank} filled in."""
        assert self.desc is not None, "register_kv_caches comes first"
        self._staging = open_staging(
            path_template.format(rank=self.desc.tp_rank), self.desc, num_blocks
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, HetserveMeta)
        for spec in meta.loads:
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        """Staged blocks -> vLLM's blocks, layer by layer (same descriptor: raw copies)."""
        if self._staging is None:
            raise RuntimeError(
                "a hetserve load without a staging cache (decode service not attached)"
            )
        staged = spec.staged_blocks[spec.skip_blocks :]
        targets = spec.block_ids[spec.skip_blocks :]
        if not targets:
            return
        for name, layer in self._layers.items():
            payload = self._staging.export_blocks(self._layer_index[name], staged)
            ids = torch.tensor(targets, dtype=torch.long, device=layer.device)
            scatter_payload(
                self.desc,
                {"kv": layer},
                ids,
                {k: v.to(layer.device, non_blocking=True) for k, v in payload.items()},
            )

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are whole before the forward (start_load_kv): nothing to wait for. A load here
        would run after this step's tokens were written into the cache."""

    def streams(self) -> KVStreams:
        """This rank's sender, connected on first use (only producers need one)."""
        if self._streams is None:
            assert self.desc is not None
            self._streams = KVStreams(WorkerSettings(**self._settings), self.desc)
        return self._streams

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, HetserveMeta) and self.desc is not None
        if not meta.saves:
            return
        streams = self.streams()
        layer, cache = self._layer_index[layer_name], {"kv": self._layers[layer_name]}
        first_layer, last_layer = self.desc.layers[0], self.desc.layers[-1]
        block, per_frame = self.desc.block_size, streams.blocks_per_frame
        for spec in meta.saves:
            if spec.opens and layer == first_layer:
                streams.open(spec.rid, KVRoute.model_validate(spec.route), spec.num_tokens)
            for i in range(0, len(spec.block_ids), per_frame):
                chunk = spec.block_ids[i : i + per_frame]
                ids = torch.tensor(chunk, dtype=torch.long, device=cache["kv"].device)
                start = spec.token_start + i * block
                stop = min(spec.token_stop, start + len(chunk) * block)
                # a copy now (the only one): vLLM may reuse the blocks once the request is done
                payload = payload_buffer(gather_payload(self.desc, cache, ids))
                streams.put(spec.rid, layer, start, stop, payload)
            if spec.token_stop == spec.num_tokens and layer == last_layer:
                streams.layers_done(spec.rid)

    def wait_for_save(self) -> None:
        """Saves were copied synchronously; sending them does not hold vLLM's step."""

    # -- scheduler side ---------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        params = _params(request)
        if "staged_blocks" not in params or request.request_id in self._loaded:
            return 0, False
        return max(int(params["num_tokens"]) - num_computed_tokens, 0), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = _params(request)
        if num_external_tokens == 0 or "staged_blocks" not in params:
            return
        total = int(params["num_tokens"])
        count = -(-total // self._block_size)
        self._pending_loads[request.request_id] = LoadSpec(
            rid=params.get("rid", request.request_id),
            staged_blocks=list(params["staged_blocks"][:count]),
            block_ids=list(blocks.get_block_ids()[0][:count]),
            skip_blocks=(total - num_external_tokens) // self._block_size,
        )
        self._loaded.add(request.request_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = HetserveMeta()
        for req in scheduler_output.scheduled_new_reqs:
            if req.req_id in self._pending_loads:
                meta.loads.append(self._pending_loads.pop(req.req_id))
            extra = (req.sampling_params.extra_args if req.sampling_params else None) or {}
            params = _params(extra.get("kv_transfer_params"))
            if params.get("produce"):
                self._producing[req.req_id] = _Producing(
                    rid=params.get("rid", req.req_id),
                    route=params["route"],
                    prompt_len=len(req.prompt_token_ids),
                    block_ids=list(req.block_ids[0]),
                    sent=int(params["route"].get("token_offset", 0)),  # the decode has these
                )
                self._add_save(
                    meta,
                    req.req_id,
                    req.num_computed_tokens + scheduler_output.num_scheduled_tokens[req.req_id],
                )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self._producing:
                continue
            if cached.new_block_ids[i]:
                self._producing[req_id].block_ids += cached.new_block_ids[i][0]
            self._add_save(
                meta,
                req_id,
                cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id],
            )
        for req_id in scheduler_output.finished_req_ids:
            self._producing.pop(req_id, None)
            self._loaded.discard(req_id)
        return meta

    def _add_save(self, meta: HetserveMeta, req_id: str, computed_after_step: int) -> None:
        state, block = self._producing[req_id], self._block_size
        if computed_after_step >= state.prompt_len:
            stop = state.prompt_len
        else:
            stop = computed_after_step // block * block
        if stop <= state.sent:
            return
        meta.saves.append(
            SaveSpec(
                rid=state.rid,
                route=state.route,
                num_tokens=state.prompt_len,
                block_ids=state.block_ids[state.sent // block : -(-stop // block)],
                token_start=state.sent,
                token_stop=stop,
                # not `token_start == 0`: a decode holding a prefix has the stream begin later
                opens=not state.opened,
            )
        )
        state.sent, state.opened = stop, True
        if stop >= state.prompt_len:
            del self._producing[req_id]

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._producing.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._loaded.discard(request.request_id)
        return False, None  # saves were copied out in the step: the blocks may go


def _connector() -> HetserveConnector:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    if not isinstance(connector, HetserveConnector):
        raise RuntimeError(f"vLLM's KV connector is {type(connector).__name__}, not hetserve's")
    return connector


class HetserveWorkerExtension:
    """Mixed into vLLM's workers (worker_extension_cls): the engine's owner reaches the
    worker-side connector with engine.collective_rpc("<method>", args=...)."""

    def hetserve_descriptor(self) -> dict:
        """What this rank's real cache is, as read at registration."""
        desc = _connector().desc
        if desc is None:
            raise RuntimeError("vLLM has not registered its KV caches yet")
        return desc.model_dump()

    def hetserve_attach_staging(self, path_template: str, num_blocks: int) -> None:
        _connector().attach_staging(path_template, num_blocks)

    def hetserve_end_streams(self, ends: list[StreamEnd]) -> None:
        """The prefill service ends this rank's streams (see KVStreams.end)."""
        streams = _connector().streams()
        for end in ends:
            streams.end(end)
