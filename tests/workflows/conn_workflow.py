"""Processors for the connection tests: a gatekeeper for connection control, and an echo that
can move one connection's records to a test branch."""

from __future__ import annotations

from typing import Any

from mzserver import ConnectionEnded, ConnectionRequest


def gatekeeper(event: Any, ctx: Any) -> None:
    if isinstance(event, ConnectionEnded):
        ctx.mim["Ended"] = (ctx.mim["Ended"] or 0) + 1
        ctx.mim["Last Ended"] = event.connection.name
        return
    assert isinstance(event, ConnectionRequest)
    ctx.mim["Last Subject"] = event.tls_subject or ""
    ctx.mim["Last Request"] = (
        f"{event.id}|{event.name}|{event.peer}|{sorted(event.metadata.items())}"
    )
    token = event.metadata.get("token")
    if token == "secret":
        ctx.accept(event)
    elif token != "silent":  # "silent": no decision at all
        ctx.reject(event, f"bad token for {event.name}")


def echo(record: Any, ctx: Any) -> None:
    if record.msisdn == "switch":
        ctx.set_output_route(ctx.connection, "Subscriber", "test_branch")
    elif record.msisdn == "gone":
        ctx.route("back", record, connection=999_999)
        return
    ctx.route("back", record)


def branch(record: Any, ctx: Any) -> None:
    if record.msisdn == "restore":
        ctx.set_output_route(ctx.connection, "Subscriber", None)
    ctx.route("back", type(record)(msisdn=record.msisdn, balance=-1))
