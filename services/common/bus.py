"""The NATS connection every service holds, and the JetStream objects they share."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StreamConfig
from nats.js.errors import BadRequestError, ServiceUnavailableError
from nats.js.kv import KeyValue

from proto.messages import M, Message
from proto.subjects import Subjects
from services.common import metrics
from services.common.bus_permissions import BUS_USERS, inbox_prefix
from services.common.settings import CommonSettings
from services.common.telemetry import inject
from services.kv.endpoint import FrameEndpoint, FrameHandler, RejectHandler
from services.kv.hooks import StreamHooks
from services.kv.nats_link import NatsLink

if TYPE_CHECKING:
    from services.kv.mooncake_engine import MooncakeEngine
    from services.kv.mooncake_staging import StagingArea

log = logging.getLogger(__name__)

_HEADROOM = 16 * 1024  # NATS headers (trace context) and the frame's msgpack header

# The KV library reports through these: trace context on every frame, frames counted.
KV_HOOKS = StreamHooks(
    headers=inject, frame_sent=metrics.frame_sent, frame_received=metrics.frame_received
)


def credentials(settings: CommonSettings) -> dict[str, Any]:
    """nats.connect's arguments for who this service is on the bus, and how it trusts it."""
    out: dict[str, Any] = {}
    if settings.nats_user:
        out["user"] = settings.nats_user
        out["password"] = settings.nats_password.get_secret_value()
    if settings.nats_creds:
        out["user_credentials"] = settings.nats_creds
    if settings.nats_tls_ca or settings.nats_tls_cert:
        tls = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
        if settings.nats_tls_cert:
            tls.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key or None)
        out["tls"] = tls
    if settings.nats_username in BUS_USERS:  # replies come where only this role may listen
        out["inbox_prefix"] = inbox_prefix(settings.nats_username)
    return out


class Bus:
    def __init__(self, nc: Client, settings: CommonSettings):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self.subjects: Subjects = settings.subjects
        self.kv_engine: MooncakeEngine | None = None  # the mooncake transport's, once started
        self._kv_staging: StagingArea | None = None

    @classmethod
    async def connect(cls, settings: CommonSettings, name: str, attempts: int = 30) -> Bus:
        """Retry while the server starts (compose, `hetserve up`): it may not be there yet."""
        last: Exception | None = None
        for _ in range(attempts):
            try:
                nc = await nats.connect(
                    settings.nats_servers,
                    name=name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    connect_timeout=2,
                    **credentials(settings),
                )
                return cls(nc, settings)
            except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
                last = exc
                await asyncio.sleep(0.5)
        raise ConnectionError(f"cannot reach NATS at {settings.nats_url_public}: {last}")

    async def ensure_streams(self) -> None:
        """Create the request queue and completion log if absent (idempotent)."""
        s, replicas = self.subjects, self.settings.jetstream_replicas
        for config in (
            StreamConfig(
                name=s.requests_stream,
                subjects=[s.requests],
                retention=RetentionPolicy.WORK_QUEUE,
                max_age=600.0,
                num_replicas=replicas,
            ),
            StreamConfig(
                name=s.completions_stream,
                subjects=[s.completions],
                max_age=3600.0,
                max_msgs=100_000,
                num_replicas=replicas,
            ),
        ):
            await self._add_stream(config)

    async def _add_stream(self, config: StreamConfig, patience_s: float = 30.0) -> None:
        """A replicated stream's creation can time out while a cluster under load places it
        (seen at R3 on two busy CPUs): ask again, until `patience_s`; a stream that exists,
        made by another service or by an earlier attempt that did get through, is done."""
        deadline = asyncio.get_running_loop().time() + patience_s
        while True:
            try:
                await self.js.add_stream(config)
                return
            except BadRequestError as exc:
                log.debug("stream %s exists: %s", config.name, exc)
                return
            except (NatsTimeoutError, ServiceUnavailableError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning("creating stream %s: %s; asking again", config.name, exc)
                await asyncio.sleep(1.0)

    async def registry_bucket(self) -> KeyValue:
        bucket = self.subjects.registry_bucket
        try:
            return await self.js.key_value(bucket)
        except Exception:  # noqa: BLE001 - absent: create it
            try:
                return await self.js.create_key_value(
                    bucket=bucket,
                    history=1,
                    ttl=self.settings.instance_ttl_s * 10,
                    replicas=self.settings.jetstream_replicas,
                )
            except BadRequestError:
                return await self.js.key_value(bucket)

    @property
    def frame_limit(self) -> int:
        """Largest KV frame to send: the setting, capped below the server's max_payload."""
        return min(self.settings.max_frame_bytes, self.nc.max_payload - _HEADROOM)

    async def start_kv_transport(self) -> None:
        """Start this process's transfer engine when the transport is mooncake (blocking
        work, in a thread); the nats transport needs nothing."""
        s = self.settings
        if s.kv_transport != "mooncake" or self.kv_engine is not None:
            return
        from services.kv.mooncake_engine import MooncakeConfig, MooncakeEngine

        config = MooncakeConfig(s.mooncake_host, s.mooncake_protocol, s.mooncake_devices)
        self.kv_engine = await asyncio.to_thread(
            MooncakeEngine, config, self.frame_limit, s.kv_window
        )
        log.info("transfer engine %s (%s) started", self.kv_engine.session, s.mooncake_protocol)

    @property
    def kv_staging(self) -> StagingArea | None:
        """Where mooncake senders write this process's incoming payloads (None: nats)."""
        if self.kv_engine is None:
            return None
        if self._kv_staging is None:
            from services.kv.mooncake_staging import StagingArea

            s = self.settings
            self._kv_staging = StagingArea(
                self.kv_engine,
                s.mooncake_staging_bytes,
                self.frame_limit,
                stale_s=max(60.0, 3 * s.kv_ack_timeout_s),
            )
        return self._kv_staging

    def kv_link(self, receiver: str, rank: int = 0) -> NatsLink:
        """A windowed stream of KV frames to rank `rank` of instance `receiver`."""
        name = receiver if rank == 0 else f"{receiver} rank {rank}"
        s = self.settings
        args = (self.nc, self.subjects.kv_frames(receiver, rank), name)
        if self.kv_engine is None:
            return NatsLink(*args, s.kv_window, s.kv_ack_timeout_s, KV_HOOKS, instance=receiver)
        from services.kv.mooncake_link import MooncakeLink

        return MooncakeLink(
            *args,
            s.kv_window,
            s.kv_ack_timeout_s,
            self.kv_engine,
            KV_HOOKS,
            fail_write_after=s.mooncake_fail_write_after,
            instance=receiver,
        )

    def kv_endpoint(
        self,
        who: str,
        handle: FrameHandler,
        on_rejected: RejectHandler,
    ) -> FrameEndpoint:
        """The receiving end of this process's KV subject, on its transport."""
        return FrameEndpoint(
            who,
            lambda: self.nc.max_payload,
            handle,
            on_rejected,
            KV_HOOKS,
            staging=self.kv_staging,
            window=self.settings.kv_window,
        )

    async def publish(self, subject: str, message: Message) -> None:
        await self.nc.publish(subject, message.pack(), headers=inject())

    async def request(self, subject: str, message: Message, reply: type[M], timeout_s: float) -> M:
        msg = await self.nc.request(subject, message.pack(), timeout=timeout_s, headers=inject())
        return reply.unpack(msg.data)

    async def close(self) -> None:
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception as exc:  # noqa: BLE001 - closing anyway
                log.debug("drain: %s", exc)
