"""Processors of the conversations workflow (conversations.toml).

- ``analyze``: every reading goes back on ``echo``; one above 50 also on ``alerts``; the last
  value of each sensor is kept in the map ``latest``.
- ``answer`` (query ``ask``), by topic: ``"count"`` replies ``count`` times; ``"none"`` ends
  empty; ``"error"`` ends with a coded error; ``"bad"`` replies with a wrong field type;
  ``"dict"`` replies with a dict; ``"silent"`` returns without answering; anything else
  raises.
- ``stream`` (query ``stream``, async): replies ``count`` times; after the first reply it
  waits until the map ``gates`` holds the query's topic (the test opens it), so a test sees
  the first reply while the processor still works; what happens goes to the map ``events``.
- ``commands``: ``b"emit:N:VALUE"`` sends N readings of VALUE on ``alerts``.

For tests/test_conversations_contract.py (its TOML adds their queries and routes):

- ``whoami`` (sync): replies with what ``ctx.query`` says: ``id|name|connection id|connection
  name``.
- ``persist`` (async): replies once, then waits for its gate shielded from the cancel, then
  replies ``count - 1`` more times and completes anyway; what ``ctx.cancelled`` said then goes
  to the map ``events``.
- ``chore`` (sync): the topic is a directory; it creates ``started`` there, blocks until
  ``go`` appears, then replies and completes; what ``ctx.cancelled`` said then goes to the
  map ``events`` under ``"chore"``.
- ``relay``: every record goes back on ``echo``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio


def analyze(record: Any, ctx: Any) -> None:
    ctx.route("echo", record)
    if record.value > 50:
        ctx.route("alerts", record)
    ctx.kv("latest")[record.sensor] = record.value


def answer(question: Any, ctx: Any) -> None:
    topic = question.topic
    if topic == "count":
        for i in range(question.count - 1):
            ctx.partial(ctx.udrs.Reply(n=i, text=f"part {i}"))
        ctx.complete(ctx.udrs.Reply(n=question.count - 1, text=ctx.query.name))
    elif topic == "none":
        ctx.empty()
    elif topic == "error":
        ctx.error("out-of-range", "count {0} is more than {1}", [question.count, 10])
    elif topic == "bad":
        ctx.complete(ctx.udrs.Reply(n="one", text="x"))
    elif topic == "dict":
        ctx.complete({"n": question.count, "text": "from a dict"})
    elif topic == "silent":
        pass
    else:
        raise ValueError(f"no topic {topic!r}")


async def stream(question: Any, ctx: Any) -> None:
    events = ctx.kv("events")
    events[question.topic] = "started"
    try:
        for i in range(question.count):
            ctx.partial(ctx.udrs.Reply(n=i, text=question.topic))
            while i == 0 and question.topic not in ctx.kv("gates"):  # noqa: ASYNC110
                await trio.sleep(0.005)
        ctx.complete()
        events[question.topic] = "completed"
    except trio.Cancelled:
        events[question.topic] = f"cancelled (ctx.cancelled={ctx.cancelled})"
        raise


def commands(command: bytes, ctx: Any) -> None:
    name, _, rest = command.decode().partition(":")
    if name == "emit":
        count, value = rest.split(":")
        for i in range(int(count)):
            ctx.route("alerts", ctx.udrs.Reading(sensor=f"s{i}", value=float(value)))


def whoami(question: Any, ctx: Any) -> None:
    query = ctx.query
    text = f"{query.id}|{query.name}|{query.connection.id}|{query.connection.name}"
    ctx.complete(ctx.udrs.Reply(n=query.connection.id, text=text))


async def persist(question: Any, ctx: Any) -> None:
    topic = question.topic
    ctx.partial(ctx.udrs.Reply(n=0, text=topic))
    with trio.CancelScope(shield=True):  # a processor that carries on after the cancel
        while topic not in ctx.kv("gates"):  # noqa: ASYNC110
            await trio.sleep(0.005)
    for i in range(1, question.count):
        ctx.partial(ctx.udrs.Reply(n=i, text=topic))
    ctx.complete(ctx.udrs.Reply(n=question.count, text=topic))
    ctx.kv("events")[topic] = f"answered after the cancel (ctx.cancelled={ctx.cancelled})"


def chore(question: Any, ctx: Any) -> None:
    folder = Path(question.topic)
    (folder / "started").touch()
    deadline = time.monotonic() + 20
    while not (folder / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.005)  # sync work the loop cannot interrupt
    for i in range(question.count - 1):
        ctx.partial(ctx.udrs.Reply(n=i, text="chore"))
    ctx.complete(ctx.udrs.Reply(n=question.count - 1, text="chore"))
    ctx.kv("events")["chore"] = f"ran to its end (ctx.cancelled={ctx.cancelled})"


def relay(record: Any, ctx: Any) -> None:
    ctx.route("echo", record)
