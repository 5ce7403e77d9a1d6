"""The connector server: a workflow with an embedded TCP connector for mzconnector clients.

Public API::

    from mzserver import load_config, serve
    config = load_config("workflow.toml")          # or Config.from_dict({...})
    async with trio.open_nursery() as nursery:
        srv = await nursery.start(serve, config)   # srv.port, srv.statistics(), srv.stop()
"""

from .app import Server, serve
from .config import Config, Processor, load_config
from .connections import ConnectionEnded, ConnectionInfo, ConnectionRequest
from .errors import BindError, ConfigError, RouteError, ServerError
from .workflow import ProcessorContext

__all__ = [
    "BindError",
    "Config",
    "ConfigError",
    "ConnectionEnded",
    "ConnectionInfo",
    "ConnectionRequest",
    "Processor",
    "ProcessorContext",
    "RouteError",
    "Server",
    "ServerError",
    "load_config",
    "serve",
]
