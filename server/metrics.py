"""``/metrics``: the server's statistics in the Prometheus text format, made by the official
``prometheus_client`` from a custom collector that reads a snapshot when scraped.

Every family has a ``workflow`` label. The built-in MIMs (README, "MIM values") map to::

    Workflow Name          mzconnector_workflow_info{workflow,engine,role,instance} gauge (1)
    Started                mzconnector_start_time_seconds                          gauge
    Uptime                 mzconnector_uptime_seconds                              gauge
    Connected Clients      mzconnector_connections_open                            gauge
    Connections Accepted   mzconnector_connections_accepted_total                  counter
    Connections Refused    mzconnector_connections_refused_total                   counter
    Records In / Out       mzconnector_records_in_total, mzconnector_records_out_total
    Bytes In / Out         mzconnector_received_bytes_total, mzconnector_sent_bytes_total
    Records Refused        mzconnector_records_refused_total                       counter
    Undeliverable Records  mzconnector_records_undeliverable_total                 counter
    Unacknowledged Records mzconnector_records_unacknowledged_total                counter
    Processor Errors       mzconnector_processor_errors_total                      counter

Assigned MIMs that hold a number (int, float, bool as 0/1) are ``mzconnector_mim{name=...}``
gauges (a label, since MIM names are free text); unset ones have no sample. Per route:
``mzconnector_route_records_total``, ``..._batches_total``, ``mzconnector_route_queue_depth``
(batches waiting in its processor's inbox); per processor: ``mzconnector_processor_records_total``,
``..._exceptions_total`` (records on which it raised), ``..._busy_seconds_total``. And
``mzconnector_ready`` (1 while ``/readyz`` says ready), plus the library's process metrics.

With the NATS engine the MIM families are the workflow's totals over its live processes
(every process reports the same totals: aggregate them with ``max``, not ``sum``); the route,
processor and connection families are this process's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .observe import Observed

#: Built-in MIM -> (metric name, counter?, help).
BUILTIN_METRICS: dict[str, tuple[str, bool, str]] = {
    "Started": ("mzconnector_start_time_seconds", False, "When the server started (Unix time)."),
    "Uptime": ("mzconnector_uptime_seconds", False, "Seconds since the server started."),
    "Connected Clients": ("mzconnector_connections_open", False, "Client connections open."),
    "Connections Accepted": (
        "mzconnector_connections_accepted",
        True,
        "Client connections accepted.",
    ),
    "Connections Refused": (
        "mzconnector_connections_refused",
        True,
        "Client connections refused (limits, protocol, workflow, shutdown).",
    ),
    "Records In": ("mzconnector_records_in", True, "Records taken from clients."),
    "Bytes In": ("mzconnector_received_bytes", True, "Bytes received from clients."),
    "Records Out": ("mzconnector_records_out", True, "Records written to clients."),
    "Bytes Out": ("mzconnector_sent_bytes", True, "Bytes sent to clients."),
    "Records Refused": (
        "mzconnector_records_refused",
        True,
        "Records refused (not matching their declared type, or too large).",
    ),
    "Undeliverable Records": (
        "mzconnector_records_undeliverable",
        True,
        "Records for clients that could not be delivered.",
    ),
    "Unacknowledged Records": (
        "mzconnector_records_unacknowledged",
        True,
        "Records delivered to a subscription and never acknowledged.",
    ),
    "Processor Errors": (
        "mzconnector_processor_errors",
        True,
        "Records a processor raised on, or routed not matching their type.",
    ),
}


class ServerCollector:
    """A ``prometheus_client`` collector over a running server's snapshot."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed

    def collect(self) -> Iterator[Metric]:
        status = self.observed.status()
        workflow = status["workflow"]
        labels = ["workflow"]
        values = {m["name"]: m["value"] for m in status["mim"]}

        info = GaugeMetricFamily(
            "mzconnector_workflow_info",
            "The workflow this server runs, its engine, this process's role and instance "
            "(always 1).",
            labels=[*labels, "engine", "role", "instance"],
        )
        info.add_metric([workflow, status["engine"], status["role"], status["instance"]], 1)
        yield info
        for mim, (name, counter, text) in BUILTIN_METRICS.items():
            value = values[mim]
            if mim == "Started":
                value = value.timestamp()
            family = CounterMetricFamily if counter else GaugeMetricFamily
            metric = family(name, f"{text} (MIM {mim!r})", labels=labels)
            metric.add_metric([workflow], value)
            yield metric

        ready = GaugeMetricFamily(
            "mzconnector_ready", "1 while the server is ready (/readyz answers 200).", labels=labels
        )
        ready.add_metric([workflow], 1 if status["ready"] else 0)
        yield ready

        assigned = GaugeMetricFamily(
            "mzconnector_mim", "Assigned MIM values that are numbers.", labels=[*labels, "name"]
        )
        for mim in status["mim"]:
            number = _number(mim["value"])
            if not mim["builtin"] and number is not None:
                assigned.add_metric([workflow, mim["name"]], number)
        yield assigned

        yield from self._routes(workflow, status["routes"])
        yield from self._processors(workflow, status["processors"])

    @staticmethod
    def _routes(workflow: str, routes: list[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["workflow", "route", "consumer"]
        records = CounterMetricFamily(
            "mzconnector_route_records", "Records sent on a route.", labels=labels
        )
        batches = CounterMetricFamily(
            "mzconnector_route_batches", "Batches sent on a route.", labels=labels
        )
        depth = GaugeMetricFamily(
            "mzconnector_route_queue_depth",
            "Batches waiting in the inbox of the route's processor.",
            labels=labels,
        )
        for route in routes:
            key = [workflow, route["route"], route["consumer"]]
            records.add_metric(key, route["records"])
            batches.add_metric(key, route["batches"])
            depth.add_metric(key, route["queued"])
        yield from (records, batches, depth)

    @staticmethod
    def _processors(workflow: str, processors: list[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["workflow", "processor"]
        records = CounterMetricFamily(
            "mzconnector_processor_records", "Records a processor handled.", labels=labels
        )
        raised = CounterMetricFamily(
            "mzconnector_processor_exceptions",
            "Records a processor raised an exception on.",
            labels=labels,
        )
        busy = CounterMetricFamily(
            "mzconnector_processor_busy_seconds",
            "Seconds a processor spent on its batches.",
            labels=labels,
        )
        for processor in processors:
            key = [workflow, processor["name"]]
            records.add_metric(key, processor["records"])
            raised.add_metric(key, processor["errors"])
            busy.add_metric(key, processor["busy"])
        yield from (records, raised, busy)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


class Metrics:
    """The registry ``/metrics`` renders: the server's collector and the process's."""

    def __init__(self, observed: Observed) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(observed))  # type: ignore[arg-type]
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
