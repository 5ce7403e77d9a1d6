"""The API module of the benchmark echo workflow: one function that submits and receives."""

from __future__ import annotations

__all__ = ["call"]


def call(record, timeout: float = 5.0):
    """Submit ``record`` and return the next record the workflow sends back (its echo)."""
    submit(record)  # noqa: F821 - provided by the connector
    return receive(timeout=timeout)  # noqa: F821 - provided by the connector
