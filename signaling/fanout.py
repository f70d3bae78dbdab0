"""socket.io's in-process fan-out without a task per receiver.

`AsyncManager.emit` encodes a broadcast once, then starts one task per receiver to queue it
on that receiver's engine.io socket and waits for them all. Queuing never waits (engine.io's
send queues are unbounded), so the tasks buy nothing and cost most of a chat message's
fan-out: here the packet is queued on each receiver in turn, in the same order. Emits with a
callback (each receiver its own ack id) keep socket.io's own path."""

from __future__ import annotations

import logging
from typing import Any

import socketio
from engineio import packet as eio_packet
from socketio import packet

log = logging.getLogger(__name__)


class DirectEmit(socketio.AsyncManager):  # type: ignore[misc]
    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> None:
        room = to or room
        if callback is not None or namespace not in self.rooms:
            await super().emit(
                event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, **kwargs
            )
            return
        if isinstance(data, tuple):
            args = list(data)
        elif data is not None:
            args = [data]
        else:
            args = []
        skipped = skip_sid if isinstance(skip_sid, list) else [skip_sid]
        encoded = self.server.packet_class(
            packet.EVENT, namespace=namespace, data=[event, *args]
        ).encode()
        frames = [
            eio_packet.Packet(eio_packet.MESSAGE, p)
            for p in (encoded if isinstance(encoded, list) else [encoded])
        ]
        for sid, eio_sid in self.get_participants(namespace, room):
            if sid in skipped:
                continue
            for frame in frames:
                try:
                    await self.server._send_eio_packet(eio_sid, frame)
                except Exception:
                    # One receiver's socket failing must not keep the others from theirs.
                    log.exception("sending %r to %s failed", event[:64], sid)


class DirectRedisEmit(socketio.AsyncRedisManager, DirectEmit):  # type: ignore[misc]
    """The Redis manager (publishes every emit to the other nodes), delivering its local half
    the same way."""
