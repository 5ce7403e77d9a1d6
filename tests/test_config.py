"""The workflow configuration: TOML -> ``Config``; every error names the file, the key and the
problem; ``python -m mzserver`` refuses to start on a bad configuration."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mzconnector import DEFAULT_MAX_FRAME_SIZE
from mzserver import Config, ConfigError, load_config
from tests.conftest import ROOT, WORKFLOWS

BASE = """{top}
[workflow]
name = "t"

[connector]
accepted_types = {accepted}
input_routes = ["back"]
{connector}

[connector.output_routes]
{output_routes}

{extra}

[types.Subscriber]
msisdn = "str"
balance = "int"
{types}

[[processors]]
name = "echo"
entry = "mzserver.default.echo:echo"
routes = ["in"]
{processors}
"""


def write(tmp_path: Path, name: str = "workflow.toml", **parts: str) -> Path:
    fields = {
        "top": "",
        "accepted": '["Subscriber"]',
        "connector": "",
        "output_routes": 'Subscriber = "in"',
        "extra": "",
        "types": "",
        "processors": "",
    }
    fields.update(parts)
    path = tmp_path / name
    path.write_text(BASE.format(**fields))
    return path


def proc(name: str, entry: str, routes: str, extra: str = "") -> str:
    """One more ``[[processors]]`` table."""
    return f'[[processors]]\nname = "{name}"\nentry = "{entry}"\nroutes = {routes}\n{extra}'


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    message = str(error)
    assert error.source == str(path)
    assert message.startswith(f"{path}: ")  # the file comes first
    assert error.key in message
    assert error.problem in message
    return error


def noop(record: Any, ctx: Any) -> None:
    pass


# -- what loads ------------------------------------------------------------------------------------


def test_base_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))
    assert config.workflow == "t"
    assert config.connector.accepted_types == ["Subscriber"]
    assert config.routes == {"back": "connector", "in": "echo"}


def test_the_example_of_the_issue_loads() -> None:
    config = load_config(WORKFLOWS / "example.toml")
    assert config.workflow == "example"
    assert config.source == str(WORKFLOWS / "example.toml")
    assert config.base_dir == WORKFLOWS
    c = config.connector
    assert (c.host, c.port, c.allow_multiple_connections, c.max_connections) == (
        "127.0.0.1",
        7777,
        True,
        10,
    )
    assert c.accepted_types == ["Subscriber", "bytes"]
    assert c.input_routes == ["out"]
    assert c.output_routes == {"Subscriber": "r_1", "bytes": "r_1"}
    assert config.schema == {"Subscriber": {"msisdn": "str", "balance": "int"}}
    assert list(config.codec.types) == ["Subscriber"]
    assert config.mim == {"Last Balance": int, "Last Client": str, "Seen": int}
    assert config.mim_declared == {"Last Balance": "int", "Last Client": "str", "Seen": "int"}
    # API modules: one by path (relative to the TOML), one by module name; shipped as source.
    assert [m.name for m in config.api_modules] == ["api_noall", "demo"]
    assert "def triple" in config.api_modules[0].source
    assert '__all__ = ["double", "round_trip", "top_up"]' in config.api_modules[1].source
    assert [(p.name, p.routes, p.is_async) for p in config.processors] == [
        ("first", ("r_1",), False),
        ("second", ("r_2",), True),
    ]
    assert config.processors[0].function.__name__ == "first"
    assert config.routes == {"out": "connector", "r_1": "first", "r_2": "second"}


@pytest.mark.parametrize("name", ["example.toml", "rich.toml", "slow.toml"])
def test_test_workflows_load(name: str) -> None:
    assert load_config(WORKFLOWS / name).workflow == name.removesuffix(".toml")


def test_the_default_echo_workflow_loads() -> None:
    config = load_config(ROOT / "server" / "default" / "echo.toml")
    assert config.workflow == "echo"
    assert config.connector.port == 7777
    assert [m.name for m in config.api_modules] == ["demo"]
    assert config.mim == {"Last Balance": int, "Last MSISDN": str}


def test_every_field_type_loads(tmp_path: Path) -> None:
    types = """
[types.Rich]
i = "int"
f = "float"
s = "str"
b = "bool"
y = "bytes"
t = "datetime"
l = "list[int]"
d = "dict[str, list[Subscriber]]"
o = "Subscriber | None"
"""
    config = load_config(write(tmp_path, types=types))
    rich = config.codec.types["Rich"]
    assert rich.__struct_fields__ == ("i", "f", "s", "b", "y", "t", "l", "d", "o")


def test_limits_from_toml(tmp_path: Path) -> None:
    connector = "max_connections = 0\nmax_frame_size = 2048\nroute_buffer = 2\noutbox_size = 3"
    c = load_config(write(tmp_path, connector=connector)).connector
    assert (c.max_connections, c.max_frame_size, c.route_buffer, c.outbox_size) == (0, 2048, 2, 3)


@pytest.mark.parametrize("value", [0, 1, 99999])
def test_max_connections_in_range(tmp_path: Path, value: int) -> None:
    path = write(tmp_path, connector=f"max_connections = {value}")
    assert load_config(path).connector.max_connections == value


def test_from_dict_with_callables() -> None:
    async def handle(record: Any, ctx: Any) -> None:
        pass

    config = Config.from_dict(
        {
            "workflow": {"name": "embedded"},
            "connector": {
                "port": 0,
                "accepted_types": ["bytes"],
                "output_routes": {"bytes": "in"},
                "input_routes": ["out"],
            },
            "processors": [{"name": "p", "entry": handle, "routes": ["in"]}],
        },
        source="embedded.toml",
    )
    assert config.processors[0].function is handle
    assert config.processors[0].is_async
    assert config.source == "embedded.toml"
    assert config.connector.port == 0


def test_replace_connector(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))
    changed = config.replace_connector(port=0, host="")
    assert (changed.connector.port, changed.connector.host) == (0, "")
    assert config.connector.port == 7777  # frozen: the original is unchanged
    with pytest.raises(
        ConfigError, match=r"connector\.port: expected an integer from 0 to 65535, got 70000$"
    ):
        config.replace_connector(port=70000)


# -- errors name the file, the key and the problem -------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "key", "problem"),
    [
        pytest.param({"top": "bogus = 1"}, "bogus", "unknown key", id="unknown-top-level-key"),
        pytest.param(
            {"connector": "colour = 'red'"}, "connector.colour", "unknown key", id="unknown-key"
        ),
        pytest.param(
            {"processors": proc("x", "json:dumps", '["z"]', "speed = 1")},
            "processors[1].speed",
            "unknown key",
            id="unknown-processor-key",
        ),
        pytest.param(
            {"connector": 'port = "7777"'},
            "connector.port",
            "expected an integer from 0 to 65535, got the string '7777'",
            id="wrong-type",
        ),
        pytest.param(
            {"connector": 'allow_multiple_connections = "yes"'},
            "connector.allow_multiple_connections",
            "expected true or false, got the string 'yes'",
            id="wrong-type-bool",
        ),
        pytest.param(
            {"connector": "max_connections = 100000"},
            "connector.max_connections",
            "expected an integer from 0 to 99999, got 100000",
            id="max-connections-too-large",
        ),
        pytest.param(
            {"connector": "max_connections = -1"},
            "connector.max_connections",
            "expected an integer from 0 to 99999, got -1",
            id="max-connections-negative",
        ),
        pytest.param(
            {"types": "[types.Bad]\nwhen = 'timestamp'"},
            "types",
            "Bad.when: unknown type 'timestamp'",
            id="unknown-field-type",
        ),
        pytest.param(
            {"types": "[types.Bad]\nnext = 'Bad | None'"},
            "types",
            "cycle: Bad.next -> Bad",
            id="cyclic-types",
        ),
        pytest.param(
            {"extra": '[mim]\n"Level" = "integer"'},
            "mim.'Level'",
            "unknown type 'integer'",
            id="unknown-mim-type",
        ),
        pytest.param(
            {"output_routes": 'Subscriber = "in"\nbytes = "in"'},
            "connector.output_routes.bytes",
            "'bytes' is not in accepted_types",
            id="output-route-of-unaccepted-type",
        ),
        pytest.param(
            {"accepted": '["Subscriber", "Account"]'},
            "connector.accepted_types",
            "unknown type 'Account' (declared: Subscriber, bytes)",
            id="unknown-accepted-type",
        ),
        pytest.param(
            {"accepted": '["Subscriber", "bytes"]'},
            "connector.output_routes",
            "accepted type 'bytes' has no output route",
            id="accepted-type-without-output-route",
        ),
        pytest.param(
            {"output_routes": 'Subscriber = "nowhere"'},
            "connector.output_routes.Subscriber",
            "nothing consumes route 'nowhere'",
            id="route-nothing-consumes",
        ),
        pytest.param(
            {"processors": proc("twin", "json:dumps", '["in"]')},
            "processors[1].routes",
            "route 'in' is already consumed by processor 'echo'; "
            "each route has exactly one consumer",
            id="route-consumed-twice",
        ),
        pytest.param(
            {"processors": proc("thief", "json:dumps", '["back"]')},
            "processors[1].routes",
            "route 'back' is already consumed by the connector",
            id="route-consumed-by-connector-and-processor",
        ),
        pytest.param(
            {"processors": proc("echo", "json:dumps", '["x"]')},
            "processors[1].name",
            "two processors are named 'echo'",
            id="duplicate-processor-name",
        ),
        pytest.param(
            {"processors": proc("idle", "json:dumps", "[]")},
            "processors[1].routes",
            "a processor must consume at least one route",
            id="processor-without-routes",
        ),
        pytest.param(
            {"processors": proc("x", "no_such_module_xyz:f", '["x"]')},
            "processors[1].entry",
            "cannot import 'no_such_module_xyz': ModuleNotFoundError",
            id="entry-module-missing",
        ),
        pytest.param(
            {"processors": proc("x", "json:no_such_function", '["x"]')},
            "processors[1].entry",
            "'json' has no function 'no_such_function'",
            id="entry-function-missing",
        ),
        pytest.param(
            {"processors": proc("x", "json", '["x"]')},
            "processors[1].entry",
            "'json' is not 'file.py:function' or 'module:function'",
            id="entry-without-function",
        ),
        pytest.param(
            {"processors": proc("x", "missing.py:f", '["x"]')},
            "processors[1].entry",
            "missing.py' does not exist",
            id="entry-file-missing",
        ),
        pytest.param(
            {"extra": '[api]\nmodules = ["no_such_api.py"]'},
            "api.modules[0]",
            "no_such_api.py' does not exist",
            id="api-file-missing",
        ),
        pytest.param(
            {"extra": '[api]\nmodules = ["no_such_api_module_xyz"]'},
            "api.modules[0]",
            "API module 'no_such_api_module_xyz'",
            id="api-module-missing",
        ),
        pytest.param(
            {"extra": '[api]\nmodules = ["mzapi.demo", "mzapi.demo"]'},
            "api.modules[1]",
            "'double' is exported by both 'demo' and 'demo'",
            id="api-name-clash",
        ),
    ],
)
def test_config_errors(tmp_path: Path, parts: dict[str, str], key: str, problem: str) -> None:
    error = config_error(write(tmp_path, **parts))
    assert error.key == key
    assert problem in error.problem


@pytest.mark.parametrize(
    ("parts", "key"),
    [
        pytest.param(
            {"types": "[types.Account]\nbalance = 10"}, "types.Account.balance", id="types"
        ),
        pytest.param({"extra": '[mim]\n"Level" = 3'}, "mim.Level", id="mim"),
    ],
)
def test_wrong_type_in_a_table_of_names_names_the_key(
    tmp_path: Path, parts: dict[str, str], key: str
) -> None:
    error = config_error(write(tmp_path, **parts))
    assert error.problem.startswith("expected a string, got ")
    assert key in str(error)


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[connector\n")
    error = config_error(path)
    assert error.problem.startswith("not valid TOML")
    assert "line 1" in error.problem


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    error = config_error(path)
    assert error.problem == "cannot read the file: No such file or directory"


def test_processor_file_that_cannot_be_imported(tmp_path: Path) -> None:
    (tmp_path / "broken_proc.py").write_text("def process(record, ctx)\n    pass\n")
    processors = proc("x", "broken_proc.py:process", '["x"]')
    error = config_error(write(tmp_path, processors=processors))
    assert error.key == "processors[1].entry"
    assert "cannot import 'broken_proc.py': SyntaxError" in error.problem


def test_processor_file_that_raises_on_import(tmp_path: Path) -> None:
    (tmp_path / "raising_proc.py").write_text(
        "import no_such_dependency_xyz\n\ndef f(r, c): pass\n"
    )
    processors = proc("x", "raising_proc.py:f", '["x"]')
    error = config_error(write(tmp_path, processors=processors))
    assert error.key == "processors[1].entry"
    assert "ModuleNotFoundError: No module named 'no_such_dependency_xyz'" in error.problem


def test_processor_file_relative_to_the_toml(tmp_path: Path) -> None:
    sub = tmp_path / "flows"
    sub.mkdir()
    (sub / "procs.py").write_text("def mine(record, ctx):\n    ctx.route('back', record)\n")
    path = write(sub, processors=proc("m", "procs.py:mine", '["m"]'))
    config = load_config(path)
    assert config.processors[1].function.__name__ == "mine"
    assert config.processors[1].function.__module__.startswith("mzworkflow_")


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        pytest.param(
            '__all__ = ["double", "triple"]\n\ndef double(x):\n    return 2 * x\n',
            "bad_api.py: __all__ lists ['triple'], which the module does not define",
            id="all-names-undefined",
        ),
        pytest.param(
            "def double(x)\n    return 2 * x\n",
            "does not compile",
            id="syntax-error",
        ),
        pytest.param(
            "names = ['double']\n__all__ = names\n\ndef double(x):\n    return 2 * x\n",
            "bad_api.py: __all__ must be a literal list of names",
            id="all-not-literal",
        ),
        pytest.param(
            "__all__ = [1]\n",
            "bad_api.py: __all__ must list names (strings)",
            id="all-not-strings",
        ),
    ],
)
def test_bad_api_module(tmp_path: Path, source: str, problem: str) -> None:
    (tmp_path / "bad_api.py").write_text(source)
    error = config_error(write(tmp_path, extra='[api]\nmodules = ["bad_api.py"]'))
    assert error.key == "api.modules[0]"
    assert problem in error.problem


def test_api_all_may_name_imported_names(tmp_path: Path) -> None:
    (tmp_path / "reexport.py").write_text('from math import sqrt\n\n__all__ = ["sqrt"]\n')
    config = load_config(write(tmp_path, extra='[api]\nmodules = ["reexport.py"]'))
    assert [m.name for m in config.api_modules] == ["reexport"]


def test_an_alias_of_an_imported_function_clashes_like_a_definition(tmp_path: Path) -> None:
    (tmp_path / "one.py").write_text("from math import floor\n\nround_down = floor\n")
    (tmp_path / "two.py").write_text("def round_down(x):\n    return int(x)\n")
    error = config_error(write(tmp_path, extra='[api]\nmodules = ["one.py", "two.py"]'))
    assert error.key == "api.modules[1]"
    assert error.problem == "'round_down' is exported by both 'one' and 'two'"


def test_a_processor_file_imports_a_module_beside_it(tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    (flows / "shared").mkdir(parents=True)
    (flows / "rates.py").write_text("VAT = 0.25\n")
    (flows / "shared" / "__init__.py").write_text("from .units import CENTS\n")
    (flows / "shared" / "units.py").write_text("CENTS = 100\n")
    # A module beside it never shadows the standard library: `json` stays the real one.
    (flows / "json.py").write_text("raise RuntimeError('the workflow folder shadowed json')\n")
    (flows / "pricing.py").write_text(
        "import json\n\nimport rates\nfrom shared import CENTS\n\n"
        "def price(record, ctx):\n"
        "    ctx.route('back', json.dumps([rates.VAT, CENTS]).encode())\n"
    )
    config = load_config(write(flows, processors=proc("p", "pricing.py:price", '["p"]')))
    price = config.processors[1].function
    assert price.__globals__["rates"].VAT == 0.25
    assert price.__globals__["CENTS"] == 100
    assert price.__globals__["json"].dumps([1]) == "[1]"


def test_assigned_mims_cannot_take_a_built_in_name(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, extra='[mim]\n"Uptime" = "float"'))
    assert error.key == "mim.'Uptime'"
    assert error.problem == "is the name of a built-in MIM; choose another name"


def test_what_clients_get_at_connect_must_fit_before_they_know_the_frame_size(
    tmp_path: Path,
) -> None:
    """A client takes frames of the protocol's default size until the Welcome tells it more;
    a larger max_frame_size does not make a larger Welcome readable."""
    big = "X = " + repr("x" * (DEFAULT_MAX_FRAME_SIZE + 10)) + "\n"
    (tmp_path / "big_api.py").write_text(big)
    extra = '[api]\nmodules = ["big_api.py"]'
    connector = f"max_frame_size = {4 * DEFAULT_MAX_FRAME_SIZE}"
    error = config_error(write(tmp_path, extra=extra, connector=connector))
    assert error.key == "api.modules"
    assert f"a client takes at most {DEFAULT_MAX_FRAME_SIZE} bytes" in error.problem


def test_replace_connector_checks_what_it_changes(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))
    with pytest.raises(ConfigError) as info:
        config.replace_connector(tls={"enabled": True})
    assert info.value.key == "connector.tls.certfile"
    assert info.value.problem == "TLS is enabled but no file is given"
    with pytest.raises(ConfigError) as info:
        config.replace_connector(accepted_types=["Subscriber", "bytes"])
    assert info.value.key == "connector.output_routes"
    assert info.value.problem.startswith("accepted type 'bytes' has no output route")
    with pytest.raises(ConfigError) as info:
        config.replace_connector(colour="red")
    assert info.value.key == "connector.colour"


def test_from_dict_errors_name_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(
            {
                "connector": {"accepted_types": ["bytes"], "output_routes": {"bytes": "in"}},
                "processors": [
                    {"name": "a", "entry": noop, "routes": ["in"]},
                    {"name": "b", "entry": noop, "routes": ["in"]},
                ],
            },
            source="embedded",
        )
    assert str(info.value).startswith(
        "embedded: processors[1].routes: route 'in' is already consumed"
    )


# -- the command line ---------------------------------------------------------------------------


def run_server(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mzserver", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (
            {"connector": "max_connections = 100000"},
            "connector.max_connections: expected an integer from 0 to 99999, got 100000",
        ),
        ({"connector": "colour = 'red'"}, "connector.colour: unknown key"),
        (
            {"output_routes": 'Subscriber = "nowhere"'},
            "connector.output_routes.Subscriber: nothing consumes route 'nowhere'",
        ),
    ],
)
def test_cli_bad_config_exits_2(tmp_path: Path, parts: dict[str, str], expected: str) -> None:
    path = write(tmp_path, "bad.toml", **parts)
    result = run_server(str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"mzserver: {path}: {expected}")
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_cli_missing_config_exits_2(tmp_path: Path) -> None:
    result = run_server(str(tmp_path / "nope.toml"), "--port", "0")
    assert result.returncode == 2
    assert f"{tmp_path / 'nope.toml'}: cannot read the file" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_port_in_use_exits_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server("--port", str(port))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "use --port 0 for any free port" in result.stderr
    assert "Traceback" not in result.stderr
