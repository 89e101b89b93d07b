"""One live incident end to end: the simulator plays it, flightdeck serves it, the scripted agent
works it over MCP, and the post-mortem is written. Used by ``python -m showcase`` and the tests."""
from __future__ import annotations

import dataclasses
import gc
import secrets
import sys
from pathlib import Path
from typing import Any, Callable

import anyio
import httpx2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from flight.cli import Serving
from flightdeck.config import parse_config
from flightdeck.demo.incident import sources
from flightdeck.demo.incident.simulator import Simulator
from showcase import postmortem
from showcase.agent import Agent, Finding

POSTGRES = {"host": "127.0.0.1", "port": 5432, "database": "test", "user": "postgres"}
ACCELERATED = ("orders", "crm.customers", "logs", "metrics", "guides")


def orders_database(workdir: Path, postgres: bool | None = None) -> sources.OrdersDatabase:
    """PostgreSQL when reachable (or when asked for), else an embedded SQLite file."""
    uri = "postgresql://{user}@{host}:{port}/{database}".format(**POSTGRES)
    if postgres is not False:
        try:
            return sources.PostgresOrders(uri, **POSTGRES)
        except Exception:
            if postgres:
                raise
    return sources.SqliteOrders(workdir / "orders.sqlite")


@dataclasses.dataclass
class Outcome:
    findings: list[Finding]
    queries: int
    postmortem: Path
    series: list[dict]


class IncidentRun:
    """The pieces of one run, open between ``__enter__`` and ``__exit__`` (tests look inside)."""

    def __init__(self, workdir: Path, seed: int, seconds_per_minute: float = 1.0, postgres: bool | None = None,
                 refresh_interval: float | None = None, audit_log: Path | None = None,
                 data_dir: Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.seconds_per_minute = seconds_per_minute
        self.agent_key = "sre-" + secrets.token_hex(12)
        self.operator_key = "op-" + secrets.token_hex(12)
        self.simulator = Simulator(self.workdir, seed, orders_database(self.workdir, postgres), seconds_per_minute)
        self.on_postgres = isinstance(self.simulator.orders_db, sources.PostgresOrders)
        self.refresh_interval = refresh_interval
        self.audit_log = audit_log
        self.data_dir = data_dir  # flightdeck's model and embedding caches: shared, runs start faster
        self.serving: Serving | None = None

    def __enter__(self) -> "IncidentRun":
        try:
            self.simulator.prepare()
            config = self.simulator.config(self.agent_key, self.operator_key, self.refresh_interval,
                                           audit_log=self.audit_log)
            config["runtime"].update({"flight": {"port": 0}, "http": {"port": 0}})
            if self.data_dir is not None:
                config["runtime"]["data_dir"] = str(self.data_dir)
            self.serving = Serving(parse_config(config, self.workdir, {}))
            for name in ACCELERATED:
                if not self.serving.stack.accelerator.refresher(name).loaded.wait(300):
                    raise RuntimeError(f"the copy of {name} did not load")
        except BaseException:
            self.__exit__()
            raise
        return self

    @property
    def mcp_url(self) -> str:
        return f"{self.serving.http_url}/v1/mcp"

    def mcp_client(self, key: str) -> tuple[httpx2.AsyncClient, Callable[[], Any]]:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60)
        return http, lambda: Client(streamable_http_client(self.mcp_url, http_client=http))

    def play(self, say: Callable[[Finding], None] = lambda finding: None, out: Path | None = None) -> Outcome:
        """Lets the agent work, the clock started once it is on duty, until the incident is over."""
        agent = anyio.run(self._work, say)
        self.simulator.wait(timeout=120)
        folder = out or self.workdir / "postmortem"
        return Outcome(agent.findings, agent.queries, postmortem.write(agent.findings, agent.series, folder),
                       agent.series)

    async def _work(self, say: Callable[[Finding], None]) -> Agent:
        http, client = self.mcp_client(self.agent_key)
        async with http, client() as session:
            agent = Agent(session, self.simulator.control.recommendations_url,
                          poll_seconds=max(0.02, self.seconds_per_minute / 10), say=say,
                          on_duty=self.simulator.start)
            await agent.run()
        return agent

    def __exit__(self, *exc: Any) -> None:
        if self.serving is not None:
            self.serving.close()
            self.serving = None
            gc.collect()
        self.simulator.close()


def progress(finding: Finding) -> None:
    """A progress line per finding, as it happens."""
    print(f"[agent] {finding.step:<20} {finding.text}", file=sys.stdout, flush=True)
