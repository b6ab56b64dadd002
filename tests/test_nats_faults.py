"""The bus itself fails:
- `hetserve up`'s embedded server is killed with SIGKILL: `hetserve up` starts it again (same
  port, users, JetStream store), the services reconnect and serve transformers' tokens again;
- one server of a 3-node NATS cluster (JetStream replicas 3, as deploy/k8s runs it) is killed
  under 60 concurrent streams: the services move to the other two, nothing hangs, every
  completed answer equals transformers', at least 95% complete and every block comes back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import psutil
import pytest

from services.bench.chaos import ChaosConfig, chaos_on, first_server
from services.bench.oracle import hf_greedy
from services.common.nats_server import NatsCluster
from tests.system import RunningSystem, run_system

pytestmark = pytest.mark.slow

CONVERTED = {
    "prefill": [{"name": "p", "kv_layout": "vllm-flash", "block_size": 16}],
    "decode": [{"name": "d", "kv_layout": "vllm-cpu", "block_size": 32, "num_blocks": 1024}],
    "converter": {"replicas": 1},
}


async def _complete(system: RunningSystem, prompt: list[int], n: int) -> list[int]:
    client = openai.AsyncOpenAI(base_url=system.base_url, api_key="-", max_retries=0, timeout=30)
    reply = await client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    await client.close()
    return reply.choices[0].model_extra["token_ids"]


def _nats_server_of(up_pid: int) -> psutil.Process:
    (server,) = [p for p in psutil.Process(up_pid).children() if p.name() == "nats-server"]
    return server


def test_the_embedded_server_killed_comes_back_and_serves(tiny_llama: Path, tmp_path: Path) -> None:
    prompt = list(range(5, 45))
    expected = hf_greedy(tiny_llama, prompt, 16)
    with run_system({"model": str(tiny_llama), **CONVERTED}, None, tmp_path) as system:
        assert asyncio.run(_complete(system, prompt, 16)) == expected
        first = _nats_server_of(system.process.pid)
        first.kill()
        killed = time.monotonic()
        answers: list[str] = []  # what a client got meanwhile: each an answer or a clear error
        while True:
            assert time.monotonic() - killed < 90, answers
            try:
                tokens = asyncio.run(_complete(system, prompt, 16))
                break
            except openai.APIStatusError as exc:
                answers.append(f"{exc.status_code}: {exc.message}")
            except openai.APIConnectionError as exc:  # the gateway must not go away
                pytest.fail(f"the gateway dropped the connection: {exc}; before: {answers}")
            time.sleep(0.5)
        recovered = time.monotonic() - killed
        assert tokens == expected
        assert _nats_server_of(system.process.pid).pid != first.pid
        assert all(a.startswith(("503", "504")) for a in answers), answers
        # Every service is back on the bus: several requests at once, all right.
        many = asyncio.run(_gather(system, [prompt, prompt[:20], prompt[10:]], 16))
        assert many == [expected, hf_greedy(tiny_llama, prompt[:20], 16),
                        hf_greedy(tiny_llama, prompt[10:], 16)]  # fmt: skip
        log = system.log_path.read_text()
        assert "embedded NATS exited with code -9; starting it again" in log
        print(f"served again {recovered:.1f}s after the kill; meanwhile: {answers}")


async def _gather(system: RunningSystem, prompts: list[list[int]], n: int) -> list[list[int]]:
    return list(await asyncio.gather(*(_complete(system, p, n) for p in prompts)))


def test_one_server_of_a_three_node_cluster_killed_under_load(
    tiny_llama: Path, tmp_path: Path
) -> None:
    config = ChaosConfig.for_model(
        tiny_llama,
        prompts=12,
        max_tokens=32,
        seed=2,
        concurrency=60,
        warmup_s=6.0,
        tail_s=15.0,
        request_timeout_s=150.0,
        roles=("nats",),
    )
    cluster = NatsCluster(3).start()
    topology = {
        "model": str(tiny_llama),
        **CONVERTED,
        "decode": [{**CONVERTED["decode"][0], "replicas": 2}],
        "scheduler": {"replicas": 2},
    }
    env = {"HETSERVE_JETSTREAM_REPLICAS": "3"}
    try:
        with run_system(topology, cluster.url, tmp_path, env=env) as system:
            victims = first_server(cluster)
            report = asyncio.run(
                chaos_on(system.base_url, system.nats_url, system.prefix, config, victims)
            )
    finally:
        cluster.stop()
    summary = "\n".join(report.lines())
    print(summary)
    (kill,) = report.kills
    assert kill.in_flight > 0, summary
    assert report.hung == 0 and report.wrong == 0, summary
    assert report.completed_share >= 0.95, summary
    assert report.blocks_back_after_s is not None, summary
