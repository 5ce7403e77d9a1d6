"""``python -m mzserver [workflow.toml] [--port N] [--http-port N]``: run a workflow server until
Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from importlib import resources
from pathlib import Path

import trio

from .app import serve
from .config import Config, load_config
from .engines import ROLES
from .errors import ConfigError, ServerError

DEFAULT_WORKFLOW = "echo.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mzserver", description="Run a workflow with its mzconnector connector."
    )
    parser.add_argument(
        "config", nargs="?", help="workflow TOML file (default: the built-in echo workflow)"
    )
    parser.add_argument("--port", type=int, help="port to listen on (0 = any free port)")
    parser.add_argument("--host", help='address to bind ("" = all interfaces)')
    parser.add_argument(
        "--http-port",
        type=int,
        help="serve /healthz, /readyz, /metrics and the status page on this port "
        "([http] port; 0 = any free port)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument(
        "--role",
        default="all",
        choices=ROLES,
        help='with [engine] kind = "nats": run only the connector, or only processors',
    )
    parser.add_argument(
        "--processor",
        action="append",
        metavar="NAME",
        help="with --role worker: run this processor (repeat it; default: every one)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.config:
            config = load_config(args.config)
        else:
            with resources.as_file(resources.files("mzserver.default") / DEFAULT_WORKFLOW) as path:
                config = load_config(Path(path))
        changes = {k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None}
        if changes:
            config = config.replace_connector(**changes)
        if args.http_port is not None:
            config = config.replace_http(port=args.http_port)
        if args.processor and args.role != "worker":
            raise ConfigError(config.source, "", "--processor is for --role worker")
        unknown = sorted(set(args.processor or ()) - {p.name for p in config.processors})
        if unknown:
            raise ConfigError(config.source, "processors", f"no processor named {unknown[0]!r}")
        return trio.run(_run, config, args.role, args.processor)
    except KeyboardInterrupt:  # a Ctrl-C before the signal handlers were in place
        return 130
    except BaseException as exc:
        error = _find(exc, ServerError)
        if error is None:
            raise
        print(f"mzserver: {error}", file=sys.stderr)
        return 2


async def _run(config: Config, role: str, processors: list[str] | None) -> int:
    """Serve until stopped: 0 after a graceful stop, 130 when a second signal cut it short."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(serve, config, role=role, processors=processors)
            )
            # The first line is a contract (scripts read the address from its end); the HTTP
            # listener and the probe port each get a line of their own after it.
            if role == "worker":
                names = processors or [p.name for p in config.processors]
                print(
                    f"mzserver: workflow {config.workflow!r} worker running {', '.join(names)}",
                    flush=True,
                )
            else:
                print(
                    f"mzserver: workflow {config.workflow!r} listening on "
                    f"{server.host}:{server.port}",
                    flush=True,
                )
            if server.http_url is not None:
                print(f"mzserver: status page and probes on {server.http_url}", flush=True)
            if server.probe_port is not None:
                print(f"mzserver: TCP probe port {server.probe_port}", flush=True)

            async def on_signals() -> None:
                async for signum in signals:
                    if not server.stopping:
                        logging.getLogger("mzserver").info(
                            "%s: stopping gracefully (again to stop at once)",
                            signal.Signals(signum).name,
                        )
                        server.stop()
                    else:
                        cut_short.cancel()

            with trio.CancelScope() as cut_short:
                nursery.start_soon(on_signals)
                await server.wait_stopped()
            nursery.cancel_scope.cancel()
    return 130 if cut_short.cancelled_caught else 0


def _find(exc: BaseException, kind: type[ServerError]) -> ServerError | None:
    """The first ``kind`` in an exception (group)."""
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find(inner, kind)
        if found is not None:
            return found
    return None


if __name__ == "__main__":
    sys.exit(main())
