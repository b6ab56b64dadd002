"""The Mooncake ceiling's receiver: a transfer engine with registered memory, nothing else.

    python -m services.bench.kv_mooncake_echo NATS_URL SUBJECT NBYTES

Runs as its own process, as a decode worker does; it answers any request on SUBJECT with
where to write (msgpack {"session", "address", "nbytes"}), and the bench writes the same
frames' bytes there engine to engine, with no NATS and no receiver work at all.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import msgpack
import nats
from nats.aio.msg import Msg

from services.common.settings import CommonSettings
from services.kv.mooncake_engine import MooncakeConfig, MooncakeEngine


async def serve(url: str, subject: str, nbytes: int) -> None:
    s = CommonSettings()
    config = MooncakeConfig(s.mooncake_host, s.mooncake_protocol, s.mooncake_devices)
    engine = await asyncio.to_thread(MooncakeEngine, config, 4096, 1)
    memory = engine.register(nbytes)
    where = msgpack.packb(
        {"session": engine.session, "address": memory.address, "nbytes": memory.nbytes}
    )
    nc = await nats.connect(url, name="kv-bench-mooncake-echo")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def answer(msg: Msg) -> None:
        await msg.respond(where)

    await nc.subscribe(subject, cb=answer)
    await stop.wait()
    await nc.drain()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m services.bench.kv_mooncake_echo NATS_URL SUBJECT NBYTES")
        return 2
    asyncio.run(serve(args[0], args[1], int(args[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
