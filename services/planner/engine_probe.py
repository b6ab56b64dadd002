"""Time things on the local device: any callable, the device's peaks, and the native engine's
prefill and decode steps (services/engine), which are what calibration fits."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.engine.sequence import Sequence

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
)
KV_LAYOUT = "vllm-flash"
BLOCK_SIZE = 16


def time_call(
    fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None
) -> float:
    """Fastest wall time of `fn` over `repeats` runs, after one untimed warm-up run: on a
    shared machine the fastest run is the one other work disturbed least."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


@dataclass(frozen=True)
class DevicePeaks:
    flops: float  # matmul FLOP/s in the model's dtype
    bytes_per_s: float  # streaming read bandwidth
    memory_gb: float
    description: str


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure_peaks(device: torch.device, dtype: torch.dtype, size: int = 2048) -> DevicePeaks:
    """A size x size matmul for FLOP/s; a sum over size^2 x 32 floats (512 MiB at 2048, far
    larger than caches) for bandwidth."""
    sync = _synchronizer(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size**3 / time_call(lambda: torch.mm(a, b), 5, sync)
    buffer = torch.ones(32 * size * size, device=device, dtype=torch.float32)
    bandwidth = buffer.numel() * 4 / time_call(lambda: buffer.sum(), 5, sync)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DevicePeaks(flops, bandwidth, props.total_memory / 1e9, props.name)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return DevicePeaks(
        flops, bandwidth, memory, f"{_cpu_name()}, {torch.get_num_threads()} threads"
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def random_model(base: Path, out: Path, hidden: int, layers: int) -> Path:
    """A random model of `base`'s architecture and tokenizer, `hidden` wide and `layers` deep
    (heads of 64, a quarter as many KV heads, MLP 3.5x): timing needs shapes, not weights."""
    from safetensors.torch import save_file

    from services.engine.model import CausalLM
    from services.hf.config import load_model_config

    config = json.loads((base / "config.json").read_text())
    heads = max(1, hidden // 64)
    config.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=hidden // heads,
        intermediate_size=int(hidden * 3.5) // 64 * 64,
        torch_dtype="float32",
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    torch.manual_seed(0)
    model = CausalLM(load_model_config(out))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.02)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "rotary" not in k}
    save_file(state, str(out / "model.safetensors"))
    return out


class EngineTimer:
    """Step times of services.engine's NativeEngine: prefill of one prompt, and one decode
    step of a batch whose KV cache is allocated but left as zeros (values do not change the
    work done)."""

    def __init__(self, model_dir: Path, device: str, max_tokens: int) -> None:
        from services.engine.engine import NativeEngine

        blocks = -(-max_tokens // BLOCK_SIZE) + 64
        self.engine = NativeEngine(model_dir, KV_LAYOUT, BLOCK_SIZE, "float32", blocks, device)
        self.sync = _synchronizer(self.engine.device)
        self.vocab = self.engine.cfg.vocab_size
        self.max_positions = self.engine.max_model_len

    def _sequence(self, length: int, room: int) -> Sequence:
        from proto.messages import GenerateRequest, SamplingParams

        ids = torch.randint(0, self.vocab, (length,)).tolist()
        params = SamplingParams(max_tokens=1_000_000, temperature=0.0, ignore_eos=True)
        request = GenerateRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=ids, sampling=params
        )
        seq = self.engine.new_sequence(request)
        seq.block_table = self.engine.blocks.allocate(self.engine.blocks_for(length + room))
        return seq

    def warm_up(self) -> None:
        """Run each kind of step once untimed: first calls pay one-off set-up costs."""
        self.prefill(16, 1)
        self.decode(2, 16, 1)

    def prefill(self, length: int, repeats: int) -> float:
        seqs = [self._sequence(length, 1) for _ in range(repeats + 1)]
        pending = iter(seqs)
        try:
            return time_call(lambda: self.engine.prefill(next(pending)), repeats, self.sync)
        finally:
            for seq in seqs:
                self.engine.blocks.free(seq.block_table)

    def decode(self, batch: int, context: int, repeats: int) -> float:
        seqs = [self._sequence(context - 1, repeats + 2) for _ in range(batch)]
        for seq in seqs:
            seq.append(0)  # the first token, as if prefill had sampled it
        try:
            return time_call(lambda: self.engine.decode(seqs), repeats, self.sync)
        finally:
            for seq in seqs:
                self.engine.blocks.free(seq.block_table)
