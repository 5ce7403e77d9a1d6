"""Queries: a client asks (``conn.query(name, request)``) and the workflow answers.

A request travels on its query's route as a record of the request type, in a batch of its own
that carries its ``QueryCall``. The processor answers through its context (``ctx.partial``,
``ctx.complete``, ``ctx.empty``, ``ctx.error``); each reply is checked against the reply type
and sent to the client at once. A client that gives up cancels the call: ``ctx.cancelled``
becomes True, an async processor answering it is cancelled at its next ``await`` (the call's
cancel scope), a request not yet started is never processed, and replies made after it are
dropped. A sync processor runs to its end: nothing can interrupt it but itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from mzconnector import FieldMismatch, Message, QueryFailed, QueryReply, RecordCodec

from .connections import ConnectionInfo

if TYPE_CHECKING:
    from .config import QuerySpec
    from .outbox import Outbox

_encoder = msgspec.msgpack.Encoder()
#: Replies a query may hold for a client that does not read, before its processor is told.
MAX_BACKLOG = 65536
#: Room a reply's frame needs beside the reply itself.
FRAME_OVERHEAD = 64


class QueryCall:
    """One query in flight: ``id``, ``name`` and ``connection`` (``ctx.query``), and where its
    replies go."""

    def __init__(
        self,
        call_id: int,
        spec: QuerySpec,
        connection: ConnectionInfo,
        outbox: Outbox,
        codec: RecordCodec,
        *,
        max_frame_size: int,
        spawn: Callable[[Callable[[], Any]], None],
        on_done: Callable[[QueryCall], None],
    ) -> None:
        self.id = call_id
        self.name = spec.name
        self.connection = connection
        self.spec = spec
        self.scope = trio.CancelScope()
        self.cancelled = False
        self.done = False
        self._outbox = outbox
        self._codec = codec
        self._limit = max_frame_size - FRAME_OVERHEAD
        self._spawn = spawn
        self.on_done = on_done
        #: Told when the client gives up (an engine that answers elsewhere passes it on).
        self.on_cancel: Callable[[], None] | None = None
        self._backlog: deque[Message] = deque()

    def __repr__(self) -> str:
        return f"<query {self.name!r} #{self.id} from connection {self.connection.id}>"

    # -- the processor's answers --------------------------------------------------------------
    def partial(self, reply: Any) -> None:
        self._reply([reply], final=False)

    def complete(self, reply: Any = None) -> None:
        self._reply([] if reply is None else [reply], final=True)

    def empty(self) -> None:
        self._reply([], final=True)

    def error(self, code: str, template: str, parameters: list[Any] | tuple[Any, ...] = ()) -> None:
        if not isinstance(code, str) or not isinstance(template, str):
            raise TypeError("ctx.error(code, template, parameters): code and template are str")
        self._finish(QueryFailed(self.id, code, template, list(parameters)))

    def _reply(self, replies: list[Any], *, final: bool) -> None:
        self._check_open()
        if self.cancelled:
            if final:
                self._finish(None)
            return
        try:
            data = self._encode(replies)
        except _BadReply as exc:
            # The client gets the error instead of the reply; the processor, an exception.
            self._finish(QueryFailed(self.id, "bad-reply", exc.template, exc.parameters))
            raise TypeError(f"{self!r}: {exc.message}") from None
        if final:
            self._finish(QueryReply(self.id, msgspec.Raw(data), final=True))
        else:
            self._send(QueryReply(self.id, msgspec.Raw(data), final=False))

    def _encode(self, replies: list[Any]) -> bytes:
        name = self.spec.reply.__name__
        checked = []
        for reply in replies:
            try:
                _, encoded = self._codec.check(reply, name)
            except FieldMismatch as exc:
                if exc.field:
                    raise _BadReply(
                        "the reply's field {0} does not match {1}: {2}",
                        [exc.field, name, exc.problem],
                    ) from None
                raise _BadReply("the reply does not match {0}: {1}", [name, exc.problem]) from None
            checked.append(msgspec.Raw(encoded))
        data = _encoder.encode(checked)
        if len(data) > self._limit:
            raise _BadReply(
                "a reply of {0} bytes does not fit in a frame ({1} bytes at most)",
                [len(data), self._limit],
            )
        return data

    def _check_open(self) -> None:
        if self.done:
            raise RuntimeError(f"{self!r} is already answered")

    # -- sending -----------------------------------------------------------------------------
    def _finish(self, message: Message | None) -> None:
        self._check_open()
        self.done = True
        self.on_done(self)
        if message is not None and not self.cancelled:
            self._send(message)

    def _send(self, message: Message) -> None:
        if self._backlog or not self._outbox.put_message_nowait(message):
            if len(self._backlog) >= MAX_BACKLOG:
                raise RuntimeError(
                    f"{self!r}: {MAX_BACKLOG} replies wait for a client that does not read"
                )
            self._backlog.append(message)
            if len(self._backlog) == 1:
                self._spawn(self._drain)

    async def _drain(self) -> None:
        """Send the replies that did not fit in the outbox, in order, as it makes room."""
        while self._backlog:
            await self._outbox.put_message(self._backlog[0])
            self._backlog.popleft()

    # -- the client's side -------------------------------------------------------------------
    def cancel(self) -> None:
        """The client gave up: drop what comes, stop an async processor at its next await."""
        if self.cancelled:
            return
        self.cancelled = True
        self._backlog.clear()
        self.scope.cancel()
        if self.on_cancel is not None and not self.done:
            self.on_cancel()

    def forward(self, message: QueryReply | QueryFailed) -> None:
        """A reply made and checked in another process: on to the client."""
        if self.done or self.cancelled:
            return
        if isinstance(message, QueryFailed) or message.final:
            self._finish(message)
        else:
            self._send(message)


class _BadReply(Exception):
    """A reply that cannot be sent, said as a query error is: a template and parameters."""

    def __init__(self, template: str, parameters: list[Any]) -> None:
        self.message = template.format(*parameters)
        super().__init__(self.message)
        self.template = template
        self.parameters = parameters
