"""``python -m showcase run [--seed N] [--speed X]``: play the live incident and watch the agent."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import click

from showcase.incident import IncidentRun, progress


@click.group()
def main() -> None:
    """The flightdeck showcase: an SRE agent resolves a live incident through MCP."""


@main.command()
@click.option("--seed", default=20261120, show_default=True, help="the incident's seed (same seed, same data)")
@click.option("--speed", default=60.0, show_default=True, help="simulated seconds per real second")
@click.option("--out", type=click.Path(path_type=Path), default=Path("incident-postmortem"), show_default=True,
              help="where the post-mortem (Markdown and PNG) is written")
@click.option("--postgres/--embedded", default=None,
              help="orders in PostgreSQL (127.0.0.1:5432/test) or in an embedded SQLite file; default: PostgreSQL "
                   "when reachable")
def run(seed: int, speed: float, out: Path, postgres: bool | None) -> None:
    """Play the incident live and print the agent's findings as they happen."""
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="flightdeck-incident-") as workdir:
        with IncidentRun(Path(workdir), seed, seconds_per_minute=60.0 / speed, postgres=postgres,
                         data_dir=Path.home() / ".cache" / "flightdeck" / "incident") as running:
            click.echo(f"incident seed {seed}: orders on {'PostgreSQL' if running.on_postgres else 'SQLite'}, "
                       f"MCP at {running.mcp_url}, {60.0 / speed:g} s per simulated minute")
            outcome = running.play(say=progress, out=out)
            truth = running.simulator.truth
            stats = [s for s in running.serving.stack.catalog.source_stats() if s["kind"] in ("postgres", "sqlite")]
            refreshes = sum(running.serving.stack.accelerator.refresher(name).status.refreshes
                            for name in ("orders", "crm.customers"))
        click.echo(f"agent tool calls: {outcome.queries}; statements the orders database received: "
                   f"{sum(s['queries'] for s in stats)}, for {refreshes} refreshes of its copies")
        click.echo(f"post-mortem: {outcome.postmortem}")
        click.echo("truth: " + json.dumps({k: v for k, v in truth.as_json().items() if k != "failed_orders"}))


if __name__ == "__main__":
    main()
