"""The `flightdeck` command line."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click
import pyarrow as pa

from flight import __version__
from flight.config import ConfigError, LoadedConfig, load_config

DEFAULT_URL = "grpc://127.0.0.1:50051"


def _load(config_path: str | None) -> LoadedConfig:
    if config_path is None:
        from flight.demo import ensure_demo
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


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="flightdeck.yaml (default: the bundled demo)")
@click.option("--flight-port", type=int, help="Flight SQL port (default 50051; 0 picks a free one)")
@click.option("--http-port", type=int, help="HTTP port (the HTTP API is not served by this version)")
@click.option("--host", help="interface to bind (default 127.0.0.1)")
def run(config_path: str | None, flight_port: int | None, http_port: int | None,
        host: str | None) -> None:
    """Start the stack and serve until Ctrl-C."""
    from flight.runtime import Runtime

    loaded = _load(config_path)
    if host and host not in ("127.0.0.1", "localhost", "::1") and not loaded.config.runtime.auth.enabled:
        raise click.ClickException("binding beyond loopback needs runtime.auth in the configuration")
    try:
        runtime = Runtime(loaded, flight_port=flight_port, flight_host=host)
    except Exception as error:
        raise click.ClickException(f"cannot start: {loaded.redact(str(error))}") from None
    if http_port is not None:
        click.echo("note: the HTTP API is not part of this version; --http-port is ignored", err=True)
    for dataset in runtime.catalog.datasets.values():
        state = "ready" if dataset.state == "ready" else f"UNAVAILABLE: {dataset.error}"
        click.echo(f"  {dataset.qualified_name:<28} {dataset.spec.kind:<8} {state}", err=True)
    click.echo(f"flightdeck {__version__}: Flight SQL on {runtime.flight_url} (Ctrl-C stops)", err=True)
    # Tests and scripts wait for this exact line on stdout.
    click.echo(f"READY {runtime.flight_url}")
    sys.stdout.flush()
    runtime.serve()
    click.echo("flightdeck stopped", err=True)


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
def validate(config_path: str) -> None:
    """Check a configuration file without starting anything."""
    loaded = _load(config_path)
    problems = _check_sources(loaded)
    for name, kind, problem in problems:
        click.echo(f"warning: datasets {name} ({kind}): {loaded.redact(problem)}", err=True)
    click.echo(f"{config_path}: valid ({len(loaded.config.datasets)} datasets)")


def _check_sources(loaded: LoadedConfig) -> list[tuple[str, str, str]]:
    from federation.catalog import Catalog
    catalog = Catalog(loaded.config.dataset_specs(), loaded.base_dir)
    try:
        return [(d.spec.name, d.spec.kind, d.error) for d in catalog.datasets.values() if d.error]
    finally:
        catalog.close()


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--rows/--no-rows", default=True, help="count rows where that is cheap")
def datasets(config_path: str | None, rows: bool) -> None:
    """List datasets: name, source kind, state, schema and rows."""
    from federation.catalog import Catalog
    from rich.console import Console
    from rich.table import Table

    loaded = _load(config_path)
    catalog = Catalog(loaded.config.dataset_specs(), loaded.base_dir)
    table = Table("dataset", "from", "state", "rows", "schema")
    try:
        for dataset in catalog.datasets.values():
            count = ""
            if rows and dataset.connector is not None:
                known = dataset.connector.row_count(dataset.spec.location)
                count = "" if known is None else f"{known:,}"
            schema = ", ".join(f"{f.name} {f.type}" for f in dataset.arrow_schema) \
                if dataset.arrow_schema is not None else loaded.redact(dataset.error or "")
            table.add_row(dataset.qualified_name, dataset.spec.kind, dataset.state, count, schema)
    finally:
        catalog.close()
    Console().print(table)


@main.command()
@click.option("-e", "--execute", "query", help="run one statement and exit")
@click.option("--url", default=lambda: os.environ.get("FLIGHTDECK_URL", DEFAULT_URL), show_default=DEFAULT_URL)
@click.option("--api-key", default=lambda: os.environ.get("FLIGHTDECK_API_KEY"), help="bearer API key")
@click.option("--username", help="username (with --password)")
@click.option("--password", help="password", default=lambda: os.environ.get("FLIGHTDECK_PASSWORD"))
@click.option("--format", "output", type=click.Choice(["table", "csv", "json"]), default="table")
def sql(query: str | None, url: str, api_key: str | None, username: str | None,
        password: str | None, output: str) -> None:
    """Run SQL against a flightdeck server over Flight SQL (a REPL without -e)."""
    from flight.client import connect, run_query

    try:
        connection = connect(url, api_key=api_key, username=username, password=password)
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
