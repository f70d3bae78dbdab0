"""Requests between workers over Redis pub/sub (signaling/routing.py's WorkerLink): each
worker listens on an inbox channel of its own; a request carries an id, and its answer comes
back on the asker's inbox. Redis pub/sub keeps one publisher's messages to one channel in
order, which keeps a connection's relayed events in order too (the edge sends the next only
after the answer to the last)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging

from rooms.errors import Unavailable
from server.redis_conn import REDIS_AWAY, client, reachable, subscribe_again
from signaling.routing import Handler, Message, WorkerGone
from signaling.tasks import TaskSet

log = logging.getLogger(__name__)

_INBOX = "telemed:inbox:"
# How long an asker waits for an answer: a relayed join may wait for the database.
CALL_TIMEOUT_S = 15.0
RESUBSCRIBE_S = 0.5


class RedisWorkerLink:
    def __init__(self, url: str, worker_id: str, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._redis = client(url)
        self._pubsub = self._redis.pubsub()
        self._me = worker_id
        self._timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._handler: Handler | None = None
        self._listener: asyncio.Task[None] | None = None
        self._handling = TaskSet("relayed request")
        # False while our inbox is not subscribed: an answer sent to us then would be lost.
        self._listening = False

    async def start(self, handler: Handler) -> None:
        """Subscribes before the worker serves, so no request sent to it later is missed."""
        self._handler = handler
        await self._pubsub.subscribe(_INBOX + self._me)
        self._listening = True
        self._listener = asyncio.create_task(self._listen(), name="worker-link")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._handling.cancel_all()
        for waiting in self._waiting.values():
            waiting.cancel()
        with contextlib.suppress(*REDIS_AWAY):
            await self._pubsub.aclose()
        await self._redis.aclose()

    async def call(self, worker: str, message: Message) -> Message:
        if not self._listening:
            raise Unavailable("the link to the room's worker is down; try again")
        request_id = next(self._ids)
        answer: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            with reachable("the room's worker"):
                heard = await self._redis.publish(
                    _INBOX + worker,
                    json.dumps({"id": request_id, "from": self._me, "body": message}),
                )
            if not heard:
                raise WorkerGone("the room's worker is gone; try again")
            try:
                return await asyncio.wait_for(answer, self._timeout_s)
            except TimeoutError:
                raise Unavailable("the room's worker did not answer; try again") from None
        finally:
            self._waiting.pop(request_id, None)

    async def tell(self, worker: str, message: Message) -> None:
        with contextlib.suppress(*REDIS_AWAY):
            await self._redis.publish(_INBOX + worker, json.dumps({"body": message}))

    async def _listen(self) -> None:
        while True:
            try:
                raw = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except REDIS_AWAY:
                self._listening = False
                await self._subscribe_again()
                self._listening = True
                continue
            if raw is None or raw.get("type") != "message":
                continue
            try:
                envelope = json.loads(raw["data"])
            except ValueError:
                log.warning("worker link: unreadable message dropped")
                continue
            if "answer_to" in envelope:
                waiting = self._waiting.get(envelope["answer_to"])
                if waiting is not None and not waiting.done():
                    waiting.set_result(envelope["body"])
                continue
            # Each request in a task of its own (a join waits for the database); they start
            # in arrival order, and the namespace's per-connection lock keeps that order.
            self._handling.start(self._answer(envelope))

    async def _answer(self, envelope: Message) -> None:
        assert self._handler is not None
        try:
            answer = await self._handler(envelope["body"])
        except Exception:
            log.exception("a relayed request failed")
            answer = {"ok": False, "error": {"code": "internal", "message": "the server failed"}}
        if "id" in envelope and "from" in envelope:
            with contextlib.suppress(*REDIS_AWAY):
                await self._redis.publish(
                    _INBOX + str(envelope["from"]),
                    json.dumps({"answer_to": envelope["id"], "body": answer or {}}),
                )

    async def _subscribe_again(self) -> None:
        """Redis went away: requests sent meanwhile are lost (their askers time out and tell
        their clients `unavailable`)."""
        log.warning("worker link: Redis is unreachable; subscribing again")
        self._pubsub = await subscribe_again(
            self._redis, self._pubsub, _INBOX + self._me, RESUBSCRIBE_S
        )
        log.info("worker link: subscribed again")
