"""What the server shows of itself: one snapshot of its statistics, read on demand by the
status page (``/api/status``) and the Prometheus collector (``/metrics``).

Nothing here runs on the hot path: the connector, routes and processors only bump plain
counters (once per batch); a snapshot reads them when someone asks.

The MIM values are the workflow's, as the engine gives them (``engine.mim_snapshot()``: with the
NATS engine, the totals of every live process); routes, processors and clients are this
process's (a worker has no clients, a connector-only process no processors).
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from .health import Health
from .mim import BUILTIN_MIMS, MimTable

if TYPE_CHECKING:
    from .config import Config
    from .connector import Connector
    from .engines import Engine
    from .workflow import Workflow


class Observed:
    """The parts of a running server a snapshot reads."""

    def __init__(
        self,
        config: Config,
        mim: MimTable,
        engine: Engine,
        workflow: Workflow,
        connector: Connector | None,
        health: Health,
        *,
        role: str = "all",
    ) -> None:
        self.config = config
        self.mim = mim
        self.engine = engine
        self.routes = engine.routes
        self.workflow = workflow
        self.connector = connector
        self.health = health
        self.role = role

    def status(self) -> dict[str, Any]:
        """Everything the status page shows, as plain values (datetimes stay datetimes)."""
        mim = self.engine.mim_snapshot()
        connections = [] if self.connector is None else list(self.connector.connections.values())
        health = self.health
        consumers = self.config.routes
        declared = self.config.mim_declared
        return {
            "workflow": self.config.workflow,
            "engine": self.engine.kind,
            "role": self.role,
            "instance": self.engine.instance,
            "started": self.mim.started_at,
            "uptime": mim["Uptime"],
            "now": datetime.datetime.now(datetime.timezone.utc),
            "ready": health.ready,
            "phase": health.phase.value,
            "reasons": health.reasons(),
            "totals": {
                "records_in": mim["Records In"],
                "records_out": mim["Records Out"],
                "records_refused": mim["Records Refused"],
                "undeliverable": mim["Undeliverable Records"],
                "processor_errors": mim["Processor Errors"],
                "connections_open": mim["Connected Clients"],
                "connections_accepted": mim["Connections Accepted"],
                "connections_refused": mim["Connections Refused"],
            },
            "routes": [
                {
                    "route": route,
                    "consumer": consumers.get(route, "?"),
                    "records": stats.records,
                    "batches": stats.batches,
                    "queued": stats.queued,
                }
                for route, stats in sorted(self.routes.stats.items())
            ],
            "processors": [
                {
                    "name": runner.processor.name,
                    "routes": list(runner.processor.routes),
                    "records": runner.stats.records,
                    "batches": runner.stats.batches,
                    "errors": runner.stats.errors,
                    "busy": runner.stats.busy,
                }
                for runner in self.workflow.runners
            ],
            "clients": [
                {
                    "id": conn.id,
                    "name": conn.info.name,
                    "peer": conn.info.peer,
                    "user": conn.info.tls_subject or "",
                    "since": conn.info.connected_at,
                    "records_in": conn.records_in,
                    "records_out": conn.outbox.records_out,
                }
                for conn in connections
                if conn.info is not None
            ],
            "mim": [
                {
                    "name": name,
                    "value": value,
                    "builtin": name in BUILTIN_MIMS,
                    "type": declared.get(name, ""),
                }
                for name, value in mim.items()
            ],
        }
