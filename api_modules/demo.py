"""An example API module.

The connector ships this file's source to every client at connect; the client runs it in a
fresh module namespace and exposes the names in ``__all__`` as ``conn.api.<name>``. The code
runs in the client (the notebook), never in the server.

Besides the usual Python builtins, the connector provides these names to the module, bound to
the connection it arrived on: ``connection``, ``submit``, ``submit_many``, ``flush``,
``receive``, ``udrs`` (the record types) and ``mim``. Use them inside functions: they exist
only on the client. They take the same arguments under both clients; under the async client
(``connect_async``) ``submit_many``, ``flush``, ``receive`` and ``mim`` are coroutine
functions, so a function that returns what they return is awaited there:
``await conn.api.round_trip(...)``.
"""

__all__ = ["double", "round_trip", "top_up"]


def double(x: float) -> float:
    """Return twice ``x``: the smallest possible API function."""
    return 2 * x


def top_up(msisdn: str, amount: int) -> None:
    """Submit a ``Subscriber`` record with ``amount`` as its balance."""
    submit(udrs.Subscriber(msisdn=msisdn, balance=amount))  # noqa: F821 - provided by the connector


def round_trip(msisdn: str, amount: int, timeout: float = 5.0):
    """Submit a ``Subscriber`` and return the next record the workflow sends back (under the
    async client, an awaitable of it)."""
    top_up(msisdn, amount)
    return receive(timeout=timeout)  # noqa: F821 - provided by the connector


def _not_exported() -> None:
    """Names starting with an underscore, and names missing from ``__all__``, stay private."""
