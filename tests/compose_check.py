"""The checks of `make compose-test` against a running compose stack (scripts/compose_test.sh
starts it): every instance registered, greedy tokens equal Hugging Face transformers' through
the official `openai` client, each request's decode container named, every decode container
served requests (its stats and its Prometheus counters say so).

    python -m tests.compose_check --project P --gateway-url URL --nats-url URL --model-dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nats
import openai
from prometheus_client.parser import text_string_to_metric_families

from proto.messages import CompletionRecord, InstanceInfo
from proto.subjects import Subjects
from services.bench.oracle import hf_greedy
from services.common.settings import redact_url

ROLES_NEEDED = ("gateway", "scheduler", "converter")
HETSERVE_SERVICES = ("gateway", "scheduler", "converter", "prefill", "decode")
METRICS_URL = "http://127.0.0.1:9400/metrics"


@dataclass
class Served:
    request_id: str
    prompt: list[int]
    tokens: list[int]
    decode_instance: str = ""


def containers(project: str) -> dict[str, tuple[str, str]]:
    """Container id -> (name, compose service) of the project's running containers."""
    out = subprocess.run(
        [
            "docker",
            "ps",
            "--no-trunc",
            "--filter",
            f"label=com.docker.compose.project={project}",
            "--format",
            '{{.ID}} {{.Names}} {{.Label "com.docker.compose.service"}}',
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {cid: (name, service) for cid, name, service in rows}


def container_of(instance_id: str, running: dict[str, tuple[str, str]]) -> str:
    """Default instance ids hold the container's hostname: its short id."""
    for cid, (name, _service) in running.items():
        if cid[:12] in instance_id:
            return name
    return "?"


def scrape(container: str) -> dict[str, float]:
    """Unlabelled samples, and labelled ones summed, of a container's /metrics."""
    code = (
        f"import urllib.request as u; print(u.urlopen('{METRICS_URL}', timeout=5).read().decode())"
    )
    text = subprocess.run(
        ["docker", "exec", container, "python", "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


async def live_instances(
    nc: nats.NATS, subjects: Subjects, ttl_s: float = 4.0
) -> list[InstanceInfo]:
    try:
        kv = await nc.jetstream().key_value(subjects.registry_bucket)
        keys = await kv.keys()
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
        return []  # no service has registered yet
    infos = [InstanceInfo.unpack((await kv.get(key)).value) for key in keys]
    return [i for i in infos if time.time() - i.heartbeat_at < ttl_s]


async def wait_for_instances(
    nc: nats.NATS, subjects: Subjects, prefills: int, decodes: int, timeout_s: float
) -> list[InstanceInfo]:
    want = {"prefill": prefills, "decode": decodes, **{role: 1 for role in ROLES_NEEDED}}
    deadline = time.monotonic() + timeout_s
    while True:
        live = await live_instances(nc, subjects)
        have = Counter(i.role for i in live)
        if all(have[role] >= n for role, n in want.items()):
            return live
        if time.monotonic() > deadline:
            raise TimeoutError(f"instances live after {timeout_s}s: {dict(have)}, want {want}")
        await asyncio.sleep(1)


async def completion_records(nc: nats.NATS, subjects: Subjects) -> dict[str, CompletionRecord]:
    js = nc.jetstream()
    info = await js.stream_info(subjects.completions_stream)
    records = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        record = CompletionRecord.unpack((await js.get_msg(subjects.completions_stream, seq)).data)
        records[record.request_id] = record
    return records


async def records_of(
    nc: nats.NATS, subjects: Subjects, served: list[Served], timeout_s: float
) -> dict[str, CompletionRecord]:
    """The completion records of `served`: a decode instance publishes one after the last token
    went out, so the client may hold its answer a moment before the record lands."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = await completion_records(nc, subjects)
        if all(s.request_id in records for s in served) or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.5)


async def one_request(client: openai.AsyncOpenAI, prompt: list[int], max_tokens: int) -> Served:
    reply = await client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return Served(reply.id, prompt, reply.choices[0].model_extra["token_ids"])


async def send_round(
    client: openai.AsyncOpenAI, rng: random.Random, count: int, max_tokens: int, stagger_s: float
) -> list[Served]:
    """Requests started `stagger_s` apart, so the scheduler sees the earlier ones' load."""
    tasks = []
    for _ in range(count):
        prompt = [rng.randrange(5, 1000) for _ in range(rng.choice((3, 40, 150, 290)))]
        tasks.append(asyncio.create_task(one_request(client, prompt, max_tokens)))
        await asyncio.sleep(stagger_s)
    return list(await asyncio.gather(*tasks))


async def refuses_strangers(nats_url: str) -> None:
    """The stack's NATS admits only its users: the same address without credentials fails."""
    anonymous = redact_url(nats_url)
    try:
        stranger = await nats.connect(anonymous, connect_timeout=5, allow_reconnect=False)
    except Exception as exc:  # noqa: BLE001 - any refusal will do; a connection will not
        print(f"NATS refused an anonymous client: {type(exc).__name__}: {exc}")
        return
    await stranger.close()
    raise AssertionError(f"NATS at {anonymous} admitted an anonymous client")


async def check(args: argparse.Namespace) -> None:
    subjects = Subjects(args.prefix)
    await refuses_strangers(args.nats_url)
    nc = await nats.connect(args.nats_url, connect_timeout=5)
    try:
        live = await wait_for_instances(nc, subjects, args.prefills, args.decodes, args.timeout)
        decodes = sorted(i.instance_id for i in live if i.role == "decode")
        print(f"live: {', '.join(sorted(i.instance_id for i in live))}")
        client = openai.AsyncOpenAI(
            base_url=args.gateway_url, api_key="unused", max_retries=0, timeout=120
        )
        rng, served = random.Random(11), []
        for round_no in range(args.rounds):
            served += await send_round(client, rng, args.per_round, args.max_tokens, args.stagger)
            records = await completion_records(nc, subjects)
            used = {
                records[s.request_id].decode_instance for s in served if s.request_id in records
            }
            print(
                f"round {round_no + 1}: {len(served)} requests, decode instances used: {sorted(used)}"
            )
            if used >= set(decodes):
                break
        records = await records_of(nc, subjects, served, timeout_s=15.0)
        await report_and_verify(nc, subjects, served, records, decodes, args)
    finally:
        await nc.close()


async def report_and_verify(
    nc: nats.NATS,
    subjects: Subjects,
    served: list[Served],
    records: dict[str, CompletionRecord],
    decodes: list[str],
    args: argparse.Namespace,
) -> None:
    running = containers(args.project)
    failures = []
    for s in served:
        record = records.get(s.request_id)
        s.decode_instance = record.decode_instance if record else ""
        same = s.tokens == hf_greedy(args.model_dir, s.prompt, args.max_tokens)
        print(
            f"{s.request_id}: prompt {len(s.prompt):3d} tokens -> decode container "
            f"{container_of(s.decode_instance, running)} ({s.decode_instance or 'no record'}); "
            f"greedy tokens {'equal transformers' if same else 'DIFFER from transformers'}"
        )
        if not same:
            failures.append(f"{s.request_id}: tokens differ from transformers")
        if record is None:
            failures.append(f"{s.request_id}: no completion record")
    per_decode = Counter(s.decode_instance for s in served)
    for decode in decodes:
        stats = InstanceInfo.unpack((await nc.request(subjects.stats(decode), b"", timeout=5)).data)
        name = container_of(decode, running)
        print(f"{name}: {per_decode[decode]} requests, peak batch {stats.peak_running}")
        if per_decode[decode] == 0 or stats.peak_running == 0:
            failures.append(f"decode container {name} ({decode}) served no request")
    failures += check_metrics(running, len(served))
    if args.prometheus_url:
        failures += check_prometheus(args.prometheus_url, args, len(served))
    if failures:
        raise AssertionError("compose check failed:\n  " + "\n  ".join(failures))
    print(f"compose check passed: {len(served)} requests over {len(decodes)} decode containers")


def check_metrics(running: dict[str, tuple[str, str]], requests: int) -> list[str]:
    """Every container's /metrics: the gateway saw every request, decodes split them."""
    failures, decoded = [], 0.0
    for name, service in sorted(running.values()):
        if service not in HETSERVE_SERVICES:  # nats, prometheus
            continue
        m = scrape(name)
        if service == "gateway" and m.get("hetserve_time_to_first_token_seconds_count") != requests:
            failures.append(
                f"{name}: TTFT histogram has {m.get('hetserve_time_to_first_token_seconds_count')} "
                f"observations, want {requests}"
            )
        if service == "decode":
            decoded += m.get("hetserve_decode_requests_total", 0)
            if not m.get("hetserve_decode_requests_total"):
                failures.append(f"{name}: hetserve_decode_requests_total is 0")
        if service == "prefill":
            print(f"{name}: {m.get('hetserve_prefill_requests_total', 0):.0f} prefills")
    if decoded != requests:
        failures.append(f"decode containers finished {decoded} requests, want {requests}")
    return failures


def prometheus_query(url: str, query: str) -> list[dict]:
    full = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(full, timeout=10) as reply:
        return json.load(reply)["data"]["result"]


def check_prometheus(url: str, args: argparse.Namespace, requests: int) -> list[str]:
    """The observability profile's Prometheus scraped every container, and saw every TTFT."""
    want = {
        "gateway": 1,
        "scheduler": 1,
        "converter": 1,
        "prefill": args.prefills,
        "decode": args.decodes,
    }
    deadline, failures = time.monotonic() + 60, ["prometheus never answered"]
    while time.monotonic() < deadline:
        try:
            up = Counter(r["metric"]["job"] for r in prometheus_query(url, "up == 1"))
            ttft = prometheus_query(url, "sum(hetserve_time_to_first_token_seconds_count)")
        except OSError as exc:
            failures = [f"prometheus: {exc}"]
            time.sleep(2)
            continue
        seen = float(ttft[0]["value"][1]) if ttft else 0.0
        failures = [
            f"prometheus: {n} {job} targets up, want {n_want}"
            for job, n_want in want.items()
            if (n := up[job]) != n_want
        ]
        if seen != requests:
            failures.append(
                f"prometheus: TTFT histogram has {seen:.0f} observations, want {requests}"
            )
        if not failures:
            print(f"prometheus: every container scraped ({dict(up)}), {seen:.0f} TTFT observations")
            break
        time.sleep(2)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True, help="docker compose project name")
    parser.add_argument("--gateway-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--prefix", default="hetserve")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--prefills", type=int, default=2)
    parser.add_argument("--decodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=6)
    # Long enough that requests overlap heartbeats: the scheduler then sees one decode
    # instance loaded and places the next request on another.
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--stagger", type=float, default=0.4, help="seconds between requests")
    parser.add_argument("--prometheus-url", help="check this Prometheus scraped everything")
    parser.add_argument(
        "--timeout", type=float, default=240.0, help="seconds to wait for instances"
    )
    try:
        asyncio.run(check(parser.parse_args()))
    except (AssertionError, TimeoutError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
