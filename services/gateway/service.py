"""Gateway service: the OpenAI-compatible HTTP API in front of the bus."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from proto.messages import InstanceInfo
from services.common.service import Service
from services.common.settings import GatewaySettings
from services.gateway.admission import Admission
from services.gateway.dispatch import NatsBackend
from services.gateway.http_app import ADMISSION, create_app
from services.hf.config import load_model_config
from services.hf.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class GatewayService(Service):
    role = "gateway"
    settings: GatewaySettings
    admission: Admission | None = None

    async def start(self) -> None:
        model_dir = Path(self.settings.model)
        tokenizer, cfg = await asyncio.to_thread(
            lambda: (Tokenizer.from_model_dir(model_dir), load_model_config(model_dir))
        )
        name = self.settings.served_model_name or model_dir.name
        backend = NatsBackend(
            self.bus, self.registry, self.settings, name, cfg.max_position_embeddings
        )
        app = create_app(backend, tokenizer, self.settings)
        self.admission = app[ADMISSION]
        self.runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port)
        await site.start()
        log.info(
            "OpenAI API on http://%s:%d/v1 serving %s", self.settings.host, self.settings.port, name
        )

    def status(self) -> InstanceInfo:
        """Running: requests admitted into the system; waiting: requests queued for a slot."""
        info = super().status()
        if self.admission is not None:
            info.running = self.admission.inflight
            info.waiting = self.admission.queued
        return info

    async def stop(self) -> None:
        await self.runner.cleanup()
