"""The raw NATS ceiling's receiver: acknowledges every KV frame and does nothing else.

    python -m services.bench.kv_echo NATS_URL SUBJECT

Runs as its own process, as a decode worker does, so the ceiling pays the same process hops
and differs from the direct route only by the receiver's work (decode, checksum, store).
"""

from __future__ import annotations

import asyncio
import signal
import sys

import nats
from nats.aio.msg import Msg

from services.kv.nats_link import ack_payload

_ACK = ack_payload(True)


async def serve(url: str, subject: str) -> None:
    nc = await nats.connect(url, name="kv-bench-echo")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def ack(msg: Msg) -> None:
        if msg.reply:
            await nc.publish(msg.reply, _ACK)

    # No pending limits, as Service.subscribe: the sender's window is the only flow control.
    await nc.subscribe(subject, cb=ack, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await stop.wait()
    await nc.drain()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m services.bench.kv_echo NATS_URL SUBJECT", file=sys.stderr)
        return 2
    asyncio.run(serve(args[0], args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
