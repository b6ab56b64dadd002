"""The bus admits only its roles' users, each held to its own subjects by nats-server itself.

First against a real nats-server configured with services/common/bus_permissions.py alone:
anonymous connections refused, forged requests and KV frames dropped by the server (an admin
listening on the subject sees nothing, while the role that may publish there is heard), one
role's replies unreadable by another. Then a whole `hetserve up` on its embedded server:
every service on its role's user, greedy tokens equal transformers' on a converted and a
tensor-parallel route, the per-role URL files private, no password in the log, `hetserve
status` through the admin's URL, and a decode's credentials unable to queue a request."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import nats
import nats.errors
import openai
import pytest

from proto.subjects import Subjects
from services.bench.oracle import hf_greedy
from services.common.bus_permissions import ADMIN, BUS_USERS, authorization, inbox_prefix
from services.common.bus_users import BusUsers, url_file
from services.common.nats_server import NatsServer
from tests.system import ROOT, RunningSystem, run_system

SUBJECTS = Subjects("authtest")


@pytest.fixture(scope="module")
def users() -> BusUsers:
    return BusUsers()


@pytest.fixture(scope="module")
def secured(users: BusUsers) -> Iterator[NatsServer]:
    server = NatsServer(authorization=authorization(SUBJECTS, users.passwords)).start()
    yield server
    server.stop()


@asynccontextmanager
async def connected(url: str, user: str | None = None) -> AsyncIterator[tuple[nats.NATS, list]]:
    """A connection and the asynchronous errors the server sent it (permission violations)."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    extra = {"inbox_prefix": inbox_prefix(user)} if user else {}
    nc = await nats.connect(
        url, error_cb=on_error, allow_reconnect=False, connect_timeout=2, **extra
    )
    try:
        yield nc, errors
    finally:
        await nc.close()


def violated(errors: list[Exception]) -> bool:
    return any("permissions violation" in str(e).lower() for e in errors)


async def heard(server: NatsServer, users: BusUsers, subject: str, sender: str) -> list[bytes]:
    """What an admin subscribed to `subject` receives when `sender` publishes there; a
    sender the server refused must also have been told so."""
    got: list[bytes] = []

    async def on_msg(msg) -> None:  # noqa: ANN001
        got.append(msg.data)

    async with connected(users.url(server.url, ADMIN), ADMIN) as (admin, _):
        await admin.subscribe(subject, cb=on_msg)
        await admin.flush()
        async with connected(users.url(server.url, sender), sender) as (nc, errors):
            await nc.publish(subject, b"forged")
            await nc.flush()
            await asyncio.sleep(0.3)  # the server's -ERR arrives asynchronously
        await admin.flush()
        await asyncio.sleep(0.1)
    assert violated(errors) == (not got), (sender, subject, errors)
    return got


async def test_an_anonymous_connection_is_refused(secured: NatsServer) -> None:
    with pytest.raises((nats.errors.Error, OSError)) as refused:
        async with connected(secured.url):
            pass
    assert "authorization" in str(refused.value).lower() or isinstance(
        refused.value, nats.errors.NoServersError
    )


async def test_a_wrong_password_is_refused(secured: NatsServer, users: BusUsers) -> None:
    wrong = users.url(secured.url, "decode").replace(users.passwords["decode"], "guess")
    with pytest.raises((nats.errors.Error, OSError)):
        async with connected(wrong, "decode"):
            pass


async def test_only_the_gateway_may_queue_a_request(secured: NatsServer, users: BusUsers) -> None:
    for role in ("decode", "prefill", "converter", "scheduler"):
        assert await heard(secured, users, SUBJECTS.requests, role) == [], role
    assert await heard(secured, users, SUBJECTS.requests, "gateway") == [b"forged"]


async def test_only_prefill_and_converter_may_send_kv_frames(
    secured: NatsServer, users: BusUsers
) -> None:
    frames = SUBJECTS.kv_frames("d-0", 0)
    for role in ("gateway", "scheduler", "decode"):
        assert await heard(secured, users, frames, role) == [], role
    for role in ("prefill", "converter"):
        assert await heard(secured, users, frames, role) == [b"forged"], role


async def test_only_the_scheduler_may_reserve_blocks(secured: NatsServer, users: BusUsers) -> None:
    reserve = SUBJECTS.reserve("d-0")
    for role in ("gateway", "prefill", "converter", "decode"):
        assert await heard(secured, users, reserve, role) == [], role
    assert await heard(secured, users, reserve, "scheduler") == [b"forged"]


async def test_a_role_cannot_read_another_roles_replies(
    secured: NatsServer, users: BusUsers
) -> None:
    async with connected(users.url(secured.url, "decode"), "decode") as (nc, errors):
        await nc.subscribe(f"{inbox_prefix('prefill')}.>")
        await nc.flush()
        await asyncio.sleep(0.3)
    assert violated(errors), errors


async def test_every_role_may_announce_itself(secured: NatsServer, users: BusUsers) -> None:
    """The registry (a JetStream key-value bucket) is every role's: create, put, watch."""
    for role in BUS_USERS:
        async with connected(users.url(secured.url, role), role) as (nc, errors):
            js = nc.jetstream()
            try:
                kv = await js.key_value(SUBJECTS.registry_bucket)
            except Exception:  # noqa: BLE001 - the first role creates it
                kv = await js.create_key_value(bucket=SUBJECTS.registry_bucket, history=1)
            await kv.put(f"{role}-0", msgpack.packb({"role": role}))
            watcher = await kv.watchall()
            first = await watcher.updates(timeout=5)
            assert first is not None
            await watcher.stop()
            assert errors == [], (role, errors)


# -- a whole system on the embedded server --------------------------------------------------


def mooncake_missing() -> str:
    try:
        import mooncake.engine  # noqa: F401
    except ImportError as exc:
        return f"the mooncake package cannot be imported: {exc}"
    return ""


@pytest.fixture(
    scope="module",
    params=[
        "nats",
        pytest.param(
            "mooncake",
            marks=pytest.mark.skipif(bool(mooncake_missing()), reason=mooncake_missing()),
        ),
    ],
)
def system(request, tiny_llama: Path, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    """Over either KV transport: mooncake's payloads bypass NATS, its headers do not."""
    flash = {"kv_layout": "vllm-flash", "block_size": 16, "num_blocks": 64}
    topology = {
        "model": str(tiny_llama),
        "kv_transport": request.param,
        "prefill": [{"name": "p", **flash}],
        "decode": [
            {"name": "d-ascend", "kv_layout": "ascend", "block_size": 128, "num_blocks": 16},
            {"name": "d-tp2", "tp": 2, **flash},
        ],
        "converter": {"replicas": 1},
    }
    with run_system(topology, None, tmp_path_factory.mktemp("auth"), timeout_s=300) as running:
        yield running


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["d-ascend", "d-tp2"])
async def test_a_secured_system_gives_transformers_tokens(
    system: RunningSystem, decode: str
) -> None:
    client = openai.AsyncOpenAI(base_url=system.base_url, api_key="unused", max_retries=0)
    prompt = [random.Random(decode).randrange(5, 1000) for _ in range(40)]
    reply = await client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body={
            "return_token_ids": True,
            "ignore_eos": True,
            "hetserve_route": {"prefill_instance": "p-0", "decode_instance": f"{decode}-0"},
        },
    )
    assert reply.choices[0].model_extra["token_ids"] == hf_greedy(system.model_dir, prompt, 12)
    stats = await system.stats(f"{decode}-0")
    assert stats.free_blocks == stats.total_blocks


@pytest.mark.slow
def test_the_credentials_stay_private(system: RunningSystem, users: BusUsers) -> None:
    state = system.log_path.parent / "state"
    files = [url_file(state, user) for user in BUS_USERS]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(url_file(state, ADMIN).parent.stat().st_mode) == 0o700
    passwords = [f.read_text().strip().rsplit("@", 1)[0].rsplit(":", 1)[1] for f in files]
    assert len(set(passwords)) == len(BUS_USERS)  # one per role
    # the start-up summary comes once every instance has reported, which can be after the
    # gateway's /health turned 200 (that needs one instance of each role)
    deadline = time.monotonic() + 60
    while "hetserve status --state-dir" not in (log := system.log_text()):
        assert time.monotonic() < deadline, f"no start-up summary in the log:\n{log[-2000:]}"
        time.sleep(0.5)
    assert "embedded NATS with JetStream" in log
    assert not [p for p in passwords if p in log]


@pytest.mark.slow
def test_status_reads_the_admin_url(system: RunningSystem) -> None:
    state = system.log_path.parent / "state"
    shown = subprocess.run(
        [sys.executable, "-m", "services.cli", "status", "--state-dir", str(state),
         "--prefix", system.prefix],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "d-tp2-0" in shown.stdout and "scheduler-0" in shown.stdout


@pytest.mark.slow
async def test_a_decodes_credentials_cannot_queue_a_request(system: RunningSystem) -> None:
    state = system.log_path.parent / "state"
    decode_url = url_file(state, "decode").read_text().strip()
    async with connected(system.nats_url, ADMIN) as (admin, _):
        js = admin.jetstream()
        stream = system.subjects.requests_stream
        before = (await js.stream_info(stream)).state.last_seq
        async with connected(decode_url, "decode") as (nc, errors):
            await nc.publish(system.subjects.requests, b"forged")
            await nc.flush()
            await asyncio.sleep(0.3)
        assert any("permissions violation" in str(e).lower() for e in errors), errors
        assert (await js.stream_info(stream)).state.last_seq == before  # nothing was queued


def test_a_url_is_printed_without_its_credentials() -> None:
    from services.common.settings import CommonSettings, redact_url

    settings = CommonSettings(nats_url="nats://decode:s3cret@10.0.0.5:4222")
    assert settings.nats_url_public == "nats://10.0.0.5:4222"
    assert settings.nats_username == "decode"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_a_role_connects_with_its_own_inbox() -> None:
    from services.common.bus import credentials
    from services.common.settings import CommonSettings

    given = CommonSettings(nats_url="nats://h:1", nats_user="prefill", nats_password="pw")
    assert credentials(given) == {
        "user": "prefill",
        "password": "pw",
        "inbox_prefix": "_INBOX.prefill",
    }
    assert credentials(CommonSettings(nats_url="nats://h:1")) == {}  # anonymous, default inbox


# -- servers hetserve does not start: compose's (Kubernetes': tests/test_k8s_manifests.py) ----

COMPOSE = ROOT / "compose"


def compose_env() -> dict[str, str]:
    lines = (COMPOSE / ".env").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return dict(pairs)


def test_compose_users_are_bus_configs() -> None:
    import yaml

    from services.cli.bus_config import password_variable, server_config

    assert (COMPOSE / "nats-auth.conf").read_text() == server_config("hetserve")
    assert "include ./nats-auth.conf" in (COMPOSE / "nats.conf").read_text()
    services = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    for name in ("gateway", "scheduler", "converter", "prefill", "decode", "both"):
        user = "decode" if name == "both" else name
        env = services[name]["environment"]
        assert env["HETSERVE_NATS_USER"] == user, name
        assert env["HETSERVE_NATS_PASSWORD"] == f"${{{password_variable(user)}}}", name
    assert {password_variable(u) for u in BUS_USERS} <= set(compose_env())


@pytest.fixture
def compose_server(tmp_path: Path) -> Iterator[tuple[NatsServer, BusUsers]]:
    """nats-auth.conf as nats-server reads it, the passwords from compose/.env's variables."""
    from services.common.nats_server import find_nats_server, free_port

    server = NatsServer(port=free_port())
    (tmp_path / "nats-auth.conf").write_text((COMPOSE / "nats-auth.conf").read_text())
    (tmp_path / "nats.conf").write_text(
        f'listen: 127.0.0.1:{server.port}\njetstream {{ store_dir: "{tmp_path}/js" }}\n'
        "include ./nats-auth.conf\n"
    )
    env = compose_env()
    process = subprocess.Popen(
        [find_nats_server(), "-c", str(tmp_path / "nats.conf")],
        env={**os.environ, **{k: v for k, v in env.items() if k.startswith("NATS_PASSWORD_")}},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield server, BusUsers({u: env[f"NATS_PASSWORD_{u.upper()}"] for u in BUS_USERS})
    finally:
        process.terminate()
        process.wait(10)


async def test_compose_users_hold_on_a_real_server(
    compose_server: tuple[NatsServer, BusUsers],
) -> None:
    server, users = compose_server
    with pytest.raises((nats.errors.Error, OSError)):
        async with connected(server.url):
            pass
    assert await heard(server, users, "hetserve.requests", "decode") == []
    assert await heard(server, users, "hetserve.requests", "gateway") == [b"forged"]
