"""The `flightdeck` command line."""
from __future__ import annotations

import faulthandler
import gc
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click
import pyarrow as pa

from flightdeck import __version__
from flightdeck.auth import OPERATOR
from flightdeck.config import ConfigError, LoadedConfig, load_config
from flightdeck.runtime_config import FLIGHT_PORT, HTTP_PORT, RuntimeConfig

DEFAULT_URL = f"grpc://127.0.0.1:{FLIGHT_PORT}"
# A stop that takes longer is stuck: every thread's stack goes to stderr and the process ends,
# rather than hanging until a supervisor kills it without saying where.
STOP_PATIENCE_SECONDS = 20.0
log = logging.getLogger("flightdeck")


class Serving:
    """A running flightdeck: one Stack, the Service over it, and the enabled doors, all stopped
    along one path (``close``). ``freeze_startup``: for the process that serves until it ends
    (see ``freeze_startup_objects``)."""

    def __init__(self, loaded: LoadedConfig, runtime: RuntimeConfig | None = None, freeze_startup: bool = False):
        from flight.flightsql.server import FlightSqlServer
        from flight.http.app import build_app
        from flight.http.server import HttpServer
        from flight.mcp import http_route, http_server
        from flightdeck.service import Service
        from flightdeck.stack import Stack

        runtime = runtime or loaded.config.runtime
        tls = runtime.tls.files(loaded.base_dir) if runtime.tls else None  # a bad file stops the start here
        warn_plain_text_beyond_loopback(runtime)
        self.stack = Stack(loaded)
        self.service = Service(self.stack)
        if freeze_startup:  # before the doors take calls, whose objects would be frozen too
            freeze_startup_objects()
        self.doors: list = []  # each has shutdown(), which waits for its calls in flight
        self.flightsql: FlightSqlServer | None = None
        self.flight_url: str | None = None
        self.http: HttpServer | None = None
        self.http_url: str | None = None
        self._stop = threading.Event()
        try:
            if runtime.flight.enabled:
                endpoint = runtime.flight
                scheme = "grpc+tls" if tls else "grpc"
                self.flightsql = FlightSqlServer(
                    self.service, f"{scheme}://{endpoint.host}:{endpoint.port}",
                    max_batch_bytes=runtime.limits.max_batch_bytes,
                    handle_ttl_seconds=runtime.limits.prepared_statement_ttl_seconds, tls=tls)
                self.flight_url = f"{scheme}://{endpoint.host}:{self.flightsql.port}"
                self.doors.append(self.flightsql)
            if runtime.http.enabled:
                mcp = http_server(self.service, runtime)
                app = build_app(self.service, [http_route(mcp, runtime)],
                                lifespan=lambda app: mcp.session_manager.run())
                self.http = HttpServer(app, runtime.http.host, runtime.http.port, tls=tls)
                self.http_url = self.http.url
                self.doors.append(self.http)
        except Exception:
            for door in reversed(self.doors):
                door.shutdown()
            self.stack.close()
            raise

    def serve(self) -> None:
        """Serve until SIGINT/SIGTERM (or shutdown()); then close everything. A door serves
        from its own threads once built, so this thread only waits."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            faulthandler.dump_traceback_later(STOP_PATIENCE_SECONDS, exit=True)
            try:
                self.close()
            finally:
                faulthandler.cancel_dump_traceback_later()

    def _on_signal(self, signum, frame) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        self._stop.set()

    def shutdown(self) -> None:
        """Ask serve() to return (from any thread)."""
        self._stop.set()

    def close(self) -> None:
        """Stop every door (each waits for its calls in flight), then the stack."""
        self._stop.set()
        for door in reversed(self.doors):
            door.shutdown()
        self.doors.clear()
        self.stack.close()


def freeze_startup_objects() -> None:
    """Takes what exists once the stack is up (modules, classes, the configuration, the catalog:
    over 200,000 objects) out of the garbage collector's sight; it lives as long as the process.
    A full collection holds the GIL, stalling every door's calls, and scanned all of it: 0.1 s
    on an idle server, about 0.2 s each under 16 clients. Frozen objects are still freed when
    their last reference goes; only a cycle among them, should one become garbage, is kept, with
    what it references. For a process serving until it ends: a Serving made and closed in a
    process that goes on (the tests) is freed by the collector."""
    gc.collect()
    gc.freeze()


def _exit_now(code: int) -> None:
    """Ends the process once everything is closed, without the interpreter's finalization: the
    native runtimes' teardown at exit (DataFusion's, DuckDB's, ONNX Runtime's, gRPC's) can abort
    the process ("terminate called without an active exception") while a thread of one of them
    is still winding down, turning a clean stop into a crash."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def warn_plain_text_beyond_loopback(runtime: RuntimeConfig) -> None:
    """Keys and results cross the network in clear text when a door listens beyond loopback
    without TLS; allowed (a trusted network, a proxy that terminates TLS), but said out loud."""
    if runtime.tls is not None:
        return
    for name in ("flight", "http"):
        endpoint = getattr(runtime, name)
        if endpoint.enabled and not endpoint.is_loopback():
            log.warning("runtime.%s listens on %s without TLS: API keys and results cross the network "
                        "in plain text (set runtime.tls)", name, endpoint.host)


def _load(config_path: str | None) -> LoadedConfig:
    if config_path is None:
        from flightdeck.demo import ensure_demo
        click.echo("no -c given: serving the bundled demo (the SRE incident of 2026-11-20)", err=True)
        config_path = str(ensure_demo())
    try:
        return load_config(config_path)
    except ConfigError as error:
        raise click.ClickException(f"invalid configuration {config_path}:\n{error}") from None


@click.group()
@click.version_option(__version__, prog_name="flightdeck")
@click.option("--log-level", default=lambda: os.environ.get("FLIGHTDECK_LOG", "info"),
              type=click.Choice(["debug", "info", "warning", "error"]), show_default="info")
def main(log_level: str) -> None:
    """flightdeck: a read-only, local data stack for one agent."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


PORT = click.IntRange(0, 65535)


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="flightdeck.yaml (default: the bundled demo)")
@click.option("--flight-port", type=PORT, help=f"Flight SQL port (default {FLIGHT_PORT}; 0 picks a free one)")
@click.option("--http-port", type=PORT, help=f"HTTP port (default {HTTP_PORT}; 0 picks a free one)")
@click.option("--host", help="interface to bind (default 127.0.0.1)")
def run(config_path: str | None, flight_port: int | None, http_port: int | None,
        host: str | None) -> None:
    """Start the stack and serve until Ctrl-C."""
    loaded = _load(config_path)
    try:
        runtime = loaded.config.runtime.with_overrides(host=host, flight_port=flight_port, http_port=http_port)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if not runtime.flight.enabled and not runtime.http.enabled:
        raise click.ClickException("runtime.flight and runtime.http are both disabled: nothing to serve")
    try:
        serving = Serving(loaded, runtime, freeze_startup=True)
    except Exception as error:
        raise click.ClickException(f"cannot start: {loaded.redact(str(error))}") from None
    for dataset in serving.service.datasets(OPERATOR):
        state = "ready" if dataset["state"] == "ready" else f"UNAVAILABLE: {dataset['error']}"
        click.echo(f"  {dataset['name']:<28} {dataset['kind']:<8} {state}", err=True)
    doors = [f"{name} on {url}" for name, url in (("Flight SQL", serving.flight_url), ("HTTP", serving.http_url))
             if url]
    click.echo(f"flightdeck {__version__}: {', '.join(doors)} (Ctrl-C stops)", err=True)
    # Tests and scripts wait for this exact line on stdout: READY, then each door's URL.
    click.echo(" ".join(["READY", *(url for url in (serving.flight_url, serving.http_url) if url)]))
    sys.stdout.flush()
    serving.serve()
    click.echo("flightdeck stopped", err=True)
    _exit_now(0)


@main.command("mcp")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="flightdeck.yaml (default: the bundled demo)")
@click.option("--api-key", default=lambda: os.environ.get("FLIGHTDECK_API_KEY"),
              help="one of runtime.auth.api_keys, when auth is on (or FLIGHTDECK_API_KEY)")
def mcp_command(config_path: str | None, api_key: str | None) -> None:
    """Serve the MCP tools over stdio, for an agent that starts its tools as subprocesses.
    Nothing but MCP messages goes to stdout; logs go to stderr."""
    from flight.mcp import stdio_server
    from flightdeck.errors import ServiceError

    loaded = _load(config_path)
    runtime = loaded.config.runtime
    # Only the stack: the network doors belong to `flightdeck run`, which may be running too.
    stack_only = runtime.model_copy(update={"flight": runtime.flight.model_copy(update={"enabled": False}),
                                            "http": runtime.http.model_copy(update={"enabled": False})})
    try:
        serving = Serving(loaded, stack_only, freeze_startup=True)
    except Exception as error:
        raise click.ClickException(f"cannot start: {loaded.redact(str(error))}") from None
    try:
        server = stdio_server(serving.service, runtime, api_key)
        click.echo(f"flightdeck {__version__}: MCP over stdio", err=True)
        server.run("stdio")
    except ServiceError as error:
        raise click.ClickException(error.message) from None
    except KeyboardInterrupt:
        pass
    finally:
        serving.close()


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
def validate(config_path: str) -> None:
    """Check a configuration file without starting anything."""
    from flightdeck.sources import source_problems

    loaded = _load(config_path)
    for name, kind, problem in source_problems(loaded):
        click.echo(f"warning: datasets {name} ({kind}): {problem}", err=True)
    click.echo(f"{config_path}: valid ({len(loaded.config.datasets)} datasets)")


TLS_CA_OPTION = click.option(
    "--tls-ca", default=lambda: os.environ.get("FLIGHTDECK_TLS_CA"), type=click.Path(exists=True, dir_okay=False),
    help="PEM file of the CA that signed a grpc+tls:// server's certificate (or FLIGHTDECK_TLS_CA)")


def _server_options(command):
    """--url and credentials, for commands that talk to a running server."""
    for option in reversed([
        click.option("--url", default=lambda: os.environ.get("FLIGHTDECK_URL", DEFAULT_URL),
                     show_default=DEFAULT_URL),
        click.option("--api-key", default=lambda: os.environ.get("FLIGHTDECK_API_KEY"), help="bearer API key"),
        click.option("--username", help="username (with --password)"),
        click.option("--password", help="password", default=lambda: os.environ.get("FLIGHTDECK_PASSWORD")),
        TLS_CA_OPTION,
    ]):
        command = option(command)
    return command


@main.command()
@click.argument("dataset")
@click.option("--sql", "refresh_sql", help="a one-off working set for this refresh (SELECT * FROM NAME WHERE ...)")
@_server_options
def refresh(dataset: str, refresh_sql: str | None, url: str, api_key: str | None, username: str | None,
            password: str | None, tls_ca: str | None) -> None:
    """Refresh an accelerated dataset of a running server now, and wait for it."""
    from flight.client import refresh as request_refresh

    try:
        status = request_refresh(url, dataset, refresh_sql, api_key=api_key, username=username, password=password,
                                 tls_ca=tls_ca)
    except Exception as error:
        raise click.ClickException(_first_line(error)) from None
    if status.get("last_error"):
        raise click.ClickException(f"{dataset}: refresh failed: {status['last_error']} "
                                   f"(the copy as of {status.get('data_as_of')} keeps serving)")
    click.echo(f"{dataset}: {status['refresh_mode']} refresh read {status['last_refresh_rows']:,} rows; "
               f"the {status['engine']} ({status['mode']}) copy has {status['rows']:,} rows, "
               f"data as of {status['data_as_of']}")


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--rows/--no-rows", default=True, help="count rows where that is cheap")
@click.option("--url", help="show a running server's live status (acceleration, refreshes) instead")
@click.option("--api-key", default=lambda: os.environ.get("FLIGHTDECK_API_KEY"), help="bearer API key")
@TLS_CA_OPTION
def datasets(config_path: str | None, rows: bool, url: str | None, api_key: str | None, tls_ca: str | None) -> None:
    """List datasets: name, source kind, state, schema and rows (or a server's live status)."""
    from rich.console import Console
    from rich.table import Table

    from flightdeck.sources import dataset_overview

    if url:
        _print_live_datasets(url, api_key, tls_ca)
        return
    loaded = _load(config_path)
    table = Table("dataset", "from", "state", "rows", "schema")
    for row in dataset_overview(loaded, count_rows=rows):
        count = "" if row["rows"] is None else f"{row['rows']:,}"
        table.add_row(row["name"], row["kind"], row["state"], count, row["schema"])
    Console().print(table)


@main.group()
def cdc() -> None:
    """Change data capture (acceleration refresh_mode: changes)."""


@cdc.command("cleanup")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
@click.argument("names", nargs=-1)
def cdc_cleanup(config_path: str | None, names: tuple[str, ...]) -> None:
    """Drop the replication slots and publications kept for changes datasets (all, or NAMES):
    run it when such a dataset is removed, with flightdeck stopped."""
    from flightdeck.sources import cleanup_changes

    try:
        cleaned = cleanup_changes(_load(config_path), names)
    except Exception as error:
        raise click.ClickException(_first_line(error)) from None
    for name in cleaned:
        click.echo(f"{name}: what its source kept for the change stream is dropped")


LIVE_COLUMNS = ["name", "kind", "state", "acceleration", "refresh_state", "rows", "last_refresh_end",
                "data_as_of", "lag_p99_ms", "last_error"]


def _print_live_datasets(url: str, api_key: str | None, tls_ca: str | None) -> None:
    from flight.client import connect, run_query

    try:
        with connect(url, api_key=api_key, tls_ca=tls_ca) as connection:
            table = run_query(connection, f"SELECT {', '.join(LIVE_COLUMNS)} FROM flightdeck.runtime.datasets "
                                          "ORDER BY name")
    except Exception as error:
        raise click.ClickException(f"{url}: {_first_line(error)}") from None
    for row in table.to_pylist():  # one block per dataset: the status has too many columns for a table
        click.echo(row.pop("name"))
        for key, value in row.items():
            if value is not None:
                click.echo(f"  {key:<17} {value}")


@main.command()
@click.option("-e", "--execute", "query", help="run one statement and exit")
@_server_options
@click.option("--format", "output", type=click.Choice(["table", "csv", "json"]), default="table")
def sql(query: str | None, url: str, api_key: str | None, username: str | None,
        password: str | None, tls_ca: str | None, output: str) -> None:
    """Run SQL against a flightdeck server over Flight SQL (a REPL without -e)."""
    from flight.client import connect, run_query

    try:
        connection = connect(url, api_key=api_key, username=username, password=password, tls_ca=tls_ca)
    except Exception as error:
        raise click.ClickException(f"cannot connect to {url}: {_first_line(error)}") from None
    with connection:
        if query is not None:
            try:
                _print(run_query(connection, query), output)
            except Exception as error:
                raise click.ClickException(_first_line(error)) from None
            return
        _repl(connection, output)


def _repl(connection, output: str) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    from flight.client import run_query

    history = Path.home() / ".cache" / "flightdeck" / "sql_history"
    history.parent.mkdir(parents=True, exist_ok=True)
    session = PromptSession(history=FileHistory(str(history)))
    click.echo("flightdeck SQL: end statements with ';', Ctrl-D exits", err=True)
    buffer: list[str] = []
    while True:
        try:
            line = session.prompt("flightdeck> " if not buffer else "        ...> ")
        except KeyboardInterrupt:
            buffer.clear()
            continue
        except EOFError:
            return
        buffer.append(line)
        statement = "\n".join(buffer).strip()
        if not statement.endswith(";"):
            continue
        buffer.clear()
        try:
            _print(run_query(connection, statement.rstrip(";")), output)
        except Exception as error:
            click.echo(f"error: {_first_line(error)}", err=True)


def _print(table: pa.Table, output: str) -> None:
    if output == "csv":
        import pyarrow.csv as pacsv
        sink = pa.BufferOutputStream()
        pacsv.write_csv(table, sink)
        click.echo(sink.getvalue().to_pybytes().decode(), nl=False)
    elif output == "json":
        for row in table.to_pylist():
            click.echo(json.dumps(row, default=str))
    else:
        from rich.console import Console
        from rich.table import Table
        pretty = Table(*table.column_names)
        for row in table.to_pylist():
            pretty.add_row(*("NULL" if v is None else str(v) for v in row.values()))
        Console().print(pretty)
        click.echo(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})", err=True)


def _first_line(error: Exception) -> str:
    """A client error without gRPC's debug context."""
    text = str(error).strip()
    for marker in (". Detail:", "\ngRPC client debug context", " gRPC client debug context"):
        text = text.split(marker)[0]
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    main()
