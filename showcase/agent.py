"""A scripted SRE agent: deterministic steps, no model, and only flightdeck's MCP tools.

It polls the alerts, diagnoses with SQL and search, states every finding with the query that
shows it, sends its recommendations to the operations channel (it never changes anything
itself), and gathers what the post-mortem needs. It imports nothing of flightdeck: it is a
client, as an LLM agent would be.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
import urllib.request
from typing import Any, Callable

import anyio
from mcp.client import Client

LATENCY_ALERT = "CheckoutHighLatency"
ERRORS_ALERT = "CheckoutOrderErrors"
FIRING = ("SELECT labels_alertname AS rule, annotations_expression AS expression, \"startsAt\" AS started "
          "FROM alerts WHERE status_state = 'active' ORDER BY \"startsAt\", labels_alertname")
SATURATION_SEARCH = "checkout p99 latency high, cpu saturated on one replica while orders per minute rise"
RECOVERY_MINUTES = 5  # healthy minutes after the fix before the agent calls it recovered

# The dashboard the agent keeps an eye on while it waits: the last minute of each source.
WATCH = (
    FIRING.replace("ORDER BY", "AND labels_severity = 'critical' ORDER BY"),
    "SELECT status, count(*) AS orders, max(created_at) AS latest FROM orders GROUP BY status ORDER BY status",
    "SELECT service, level, count(*) AS lines FROM logs WHERE level <> 'INFO' GROUP BY service, level "
    "ORDER BY service, level",
    "SELECT ts, service, metric, value FROM metrics ORDER BY ts DESC, service, metric LIMIT 9",
)
ERRORS_SEARCH = ("orders failing after scaling out to three replicas: FATAL sorry, too many clients already; "
                 "pgbouncer session pooling, database max_connections reached")


@dataclasses.dataclass
class Finding:
    """One thing the agent established, the query that shows it, and what that query returned."""
    step: str
    text: str
    query: str
    rows: list[dict]
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)


class Agent:
    """Works one incident through an open MCP client session."""

    def __init__(self, client: Client, recommend_url: str, poll_seconds: float = 0.1,
                 say: Callable[[Finding], None] = lambda finding: None, patience_seconds: float = 120.0,
                 on_duty: Callable[[], None] = lambda: None):
        self.client = client
        self.on_duty = on_duty  # called once the agent is connected and knows its datasets
        self.recommend_url = recommend_url
        self.poll_seconds = poll_seconds
        self.say = say
        self.patience = patience_seconds
        self.findings: list[Finding] = []
        self.queries = 0          # tool calls made (every poll included)
        self.series: list[dict] = []

    # ---- tools ----

    async def call(self, tool: str, arguments: dict) -> dict:
        self.queries += 1
        result = await self.client.call_tool(tool, arguments)
        if result.is_error:
            raise RuntimeError(f"{tool} failed: {result.content[0].text}")
        return result.structured_content

    async def sql(self, query: str) -> list[dict]:
        answer = await self.call("sql", {"query": query})
        if answer["truncated"]:
            raise RuntimeError(f"a result was cut ({answer['notice']}): the agent's queries aggregate")
        return answer["rows"]

    async def wait_for(self, query: str, done: Callable[[list[dict]], bool], what: str) -> list[dict]:
        """Poll ``query`` until ``done(rows)``: the copies fill as the incident plays. Between
        polls the agent keeps its dashboard in view, as an on-call engineer would."""
        deadline = time.monotonic() + self.patience
        while True:
            rows = await self.sql(query)
            if done(rows):
                return rows
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for {what}")
            for watched in WATCH:
                await self.sql(watched)
            await anyio.sleep(self.poll_seconds)

    def find(self, step: str, text: str, query: str, rows: list[dict], **facts: Any) -> Finding:
        finding = Finding(step, text, query, rows, facts)
        self.findings.append(finding)
        self.say(finding)
        return finding

    def recommend(self, body: dict) -> dict:
        request = urllib.request.Request(self.recommend_url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    # ---- the investigation ----

    async def run(self) -> list[Finding]:
        datasets = (await self.call("list_datasets", {}))["datasets"]
        self.find("catalog", f"{len(datasets)} datasets granted: {', '.join(d['name'] for d in datasets)}",
                  "list_datasets", [{"name": d["name"], "accelerated": d["accelerated"]} for d in datasets])
        self.on_duty()
        alert = await self.alert(LATENCY_ALERT, "alert")
        await self.saturation(alert)
        await self.scale_out()
        await self.connection_errors()
        await self.pool_mode()
        await self.recovery()
        await self.impact()
        await self.timeline()
        return self.findings

    async def alert(self, rule: str, step: str) -> dict:
        rows = await self.wait_for(FIRING, lambda rows: any(r["rule"] == rule for r in rows), f"the {rule} alert")
        alert = next(r for r in rows if r["rule"] == rule)
        self.find(step, f"{rule} firing since {_hhmm(alert['started'])}: {alert['expression']}", FIRING, rows,
                  rule=rule, expression=alert["expression"], started=_time(alert["started"]))
        return alert

    async def saturation(self, alert: dict) -> None:
        started = _time(alert["started"])
        query = _pivot("checkout-api", ("orders_per_min", "p99_latency_ms", "cpu_utilization", "replicas"),
                       f"ts BETWEEN {_literal(started - dt.timedelta(minutes=5))} AND {_literal(started)}")
        rows = await self.wait_for(query, lambda rows: rows and _time(rows[-1]["ts"]) == started,
                                   "the metrics of the alert's minute")
        now, before = rows[-1], rows[0]
        self.find("saturation",
                  f"first cause: checkout-api saturated on {now['replicas']:.0f} replica: orders/min rose from "
                  f"{before['orders_per_min']:.0f} to {now['orders_per_min']:.0f}, CPU {now['cpu_utilization']:.0f}%, "
                  f"p99 {now['p99_latency_ms']:.0f} ms at {_hhmm(started)}", query, rows,
                  orders_per_min=now["orders_per_min"], p99_latency_ms=now["p99_latency_ms"],
                  cpu_utilization=now["cpu_utilization"], replicas=int(now["replicas"]))
        orders = ("SELECT date_trunc('minute', created_at) AS minute, count(*) AS orders, "
                  "max(latency_ms) AS slowest_ms, sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed "
                  f"FROM orders WHERE created_at >= {_literal(started - dt.timedelta(minutes=5))} "
                  f"AND created_at < {_literal(started + dt.timedelta(minutes=1))} GROUP BY 1 ORDER BY 1")
        rows = await self.sql(orders)
        self.find("saturation-orders", "the orders database agrees: more orders each minute, slower, none failing",
                  orders, rows, failed=sum(r["failed"] for r in rows))
        await self.guide(SATURATION_SEARCH, "guide-saturation")

    async def guide(self, text: str, step: str) -> str:
        answer = await self.call("search", {"text": text, "datasets": ["guides"], "limit": 3})
        ranked = [m["row"]["path"] for m in answer["matches"]]
        self.find(step, f"guide ranked first: {ranked[0]} (then {', '.join(ranked[1:])})",
                  f"search(text={text!r}, datasets=['guides'], limit=3)",
                  [{"rank": i + 1, "path": p} for i, p in enumerate(ranked)], first=ranked[0], ranked=ranked)
        return ranked[0]

    async def scale_out(self) -> None:
        answer = self.recommend({"action": "scale_out", "service": "checkout-api", "replicas": 3})
        self.find("recommend-scale", f"recommended: scale checkout-api to 3 replicas (operator: {answer})",
                  "POST /api/recommendations scale_out", [answer])
        query = _pivot("checkout-api", ("replicas", "p99_latency_ms"), "TRUE")
        rows = await self.wait_for(query, lambda rows: any(r["replicas"] == 3 for r in rows), "three replicas")
        scaled = next(r for r in rows if r["replicas"] == 3)
        self.find("scaled", f"checkout-api runs 3 replicas since {_hhmm(scaled['ts'])}", query,
                  [r for r in rows if _time(r["ts"]) >= _time(scaled["ts"]) - dt.timedelta(minutes=2)],
                  at=_time(scaled["ts"]))
        recovered = _pivot("checkout-api", ("p99_latency_ms", "error_rate"), f"ts >= {_literal(_time(scaled['ts']))}")
        rows = await self.wait_for(recovered, lambda rows: bool(rows), "latency after the scale-out")
        self.find("latency-recovered", f"p99 latency back to {rows[0]['p99_latency_ms']:.0f} ms at "
                  f"{_hhmm(rows[0]['ts'])}", recovered, rows[:1], p99_latency_ms=rows[0]["p99_latency_ms"])

    async def connection_errors(self) -> None:
        alert = await self.alert(ERRORS_ALERT, "alert-errors")
        started = _time(alert["started"])
        codes = ("SELECT error_code, count(*) AS orders FROM orders WHERE status = 'failed' "
                 f"AND created_at >= {_literal(started)} GROUP BY error_code ORDER BY orders DESC")
        rows = await self.wait_for(codes, bool, "failed orders in the copy")
        self.find("errors", f"orders fail with {rows[0]['error_code']} ({rows[0]['orders']} since {_hhmm(started)})",
                  codes, rows, error_code=rows[0]["error_code"])
        lines = {}
        for service in ("orders-db", "pgbouncer"):
            query = ("SELECT ts, service, level, message FROM logs WHERE service = "
                     f"'{service}' AND message LIKE '%too many clients%' ORDER BY ts LIMIT 1")
            found = await self.wait_for(query, bool, f"{service}'s first refusal")
            lines[service] = found[0]
            self.find(f"log-{service}", f"{service} first refused a connection at {_hhmm(found[0]['ts'], True)}: "
                      f"{found[0]['message']}", query, found, ts=_time(found[0]["ts"]), message=found[0]["message"])
        connections = _pivot("orders-db", ("active_connections", "max_connections"),
                             f"ts >= {_literal(started - dt.timedelta(minutes=4))} AND ts <= {_literal(started)}")
        rows = await self.sql(connections)
        mode = ("SELECT ts, replica, message FROM logs WHERE service = 'checkout-api' "
                "AND message LIKE '%pool_mode=%' ORDER BY ts")
        started_lines = await self.wait_for(mode, bool, "the replicas' pool mode in their start lines")
        full = rows[-1]["active_connections"] >= rows[-1]["max_connections"]
        self.find("exhaustion",
                  "second cause: connection exhaustion: each replica's PgBouncer pool runs in session mode and "
                  f"holds its own server connections; the database is at {rows[-1]['active_connections']:.0f}/"
                  f"{rows[-1]['max_connections']:.0f} connections", connections + ";\n" + mode, rows + started_lines,
                  database_full=full, session_mode=any("pool_mode=session" in r["message"] for r in started_lines),
                  postgres_line=lines["orders-db"]["message"], pgbouncer_line=lines["pgbouncer"]["message"],
                  first_error_at=min(_time(line["ts"]) for line in lines.values()))

    async def pool_mode(self) -> None:
        first = await self.guide(ERRORS_SEARCH, "guide-pooler")
        answer = self.recommend({"action": "set_pool_mode", "service": "pgbouncer", "mode": "transaction",
                                 "guide": first})
        self.find("recommend-pool-mode", f"recommended: PgBouncer pool_mode = transaction, per {first} "
                  f"(operator: {answer})", "POST /api/recommendations set_pool_mode", [answer])

    async def recovery(self) -> None:
        query = _pivot("pgbouncer", ("transaction_pooling", "server_connections"), "TRUE")
        rows = await self.wait_for(query, lambda rows: any(r["transaction_pooling"] == 1 for r in rows),
                                   "transaction pooling")
        fixed = _time(next(r for r in rows if r["transaction_pooling"] == 1)["ts"])
        self.find("fixed", f"PgBouncer in transaction mode since {_hhmm(fixed)}", query,
                  [r for r in rows if _time(r["ts"]) >= fixed], at=fixed)
        after = _pivot("checkout-api", ("error_rate", "p99_latency_ms"), f"ts >= {_literal(fixed)}")
        rows = await self.wait_for(after, lambda rows: len(rows) >= RECOVERY_MINUTES, "minutes after the fix")
        db = _pivot("orders-db", ("active_connections", "max_connections"), f"ts >= {_literal(fixed)}")
        connections = await self.sql(db)
        healthy = all(r["error_rate"] == 0 for r in rows) and all(
            r["active_connections"] < r["max_connections"] for r in connections)
        self.find("recovered", f"recovered: no failed orders for {len(rows)} minutes after the fix, database at "
                  f"{connections[-1]['active_connections']:.0f}/{connections[-1]['max_connections']:.0f} connections",
                  after + ";\n" + db, rows + connections, healthy=healthy, minutes=len(rows))

    async def impact(self) -> None:
        errors = next(f for f in self.findings if f.step == "errors").facts["error_code"]
        fixed = next(f for f in self.findings if f.step == "fixed").facts["at"]
        await self.wait_for(f"SELECT count(*) AS n FROM orders WHERE created_at >= {_literal(fixed)}",
                            lambda rows: rows[0]["n"] > 0, "the copy of orders past the fix")
        query = ("SELECT o.customer_id, c.email, c.tier, count(*) AS failed_orders FROM orders o "
                 "JOIN crm.customers c ON c.customer_id = o.customer_id "
                 f"WHERE o.error_code = '{errors}' GROUP BY o.customer_id, c.email, c.tier "
                 "ORDER BY failed_orders DESC, o.customer_id")
        rows = await self.sql(query)
        self.find("impact", f"{sum(r['failed_orders'] for r in rows)} orders failed for {len(rows)} customers",
                  query, rows, customers={r["customer_id"]: r["failed_orders"] for r in rows})

    async def timeline(self) -> None:
        query = ("SELECT ts, max(CASE WHEN metric = 'p99_latency_ms' THEN value END) AS p99_latency_ms, "
                 "max(CASE WHEN metric = 'error_rate' THEN value END) AS error_rate, "
                 "max(CASE WHEN metric = 'active_connections' THEN value END) AS active_connections, "
                 "max(CASE WHEN metric = 'max_connections' THEN value END) AS max_connections, "
                 "max(CASE WHEN metric = 'replicas' THEN value END) AS replicas, "
                 "max(CASE WHEN metric = 'orders_per_min' THEN value END) AS orders_per_min "
                 "FROM metrics GROUP BY ts ORDER BY ts")
        self.series = await self.sql(query)


def _pivot(service: str, metrics: tuple[str, ...], where: str) -> str:
    """Per-minute metrics of one service, one column each."""
    columns = ", ".join(f"max(CASE WHEN metric = '{m}' THEN value END) AS {m}" for m in metrics)
    return (f"SELECT ts, {columns} FROM metrics WHERE service = '{service}' AND ({where}) "
            "GROUP BY ts ORDER BY ts")


def _time(value: Any) -> dt.datetime:
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _literal(moment: dt.datetime) -> str:
    return f"TIMESTAMP '{moment.astimezone(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S')}Z'"


def _hhmm(value: Any, seconds: bool = False) -> str:
    return _time(value).strftime("%H:%M:%S" if seconds else "%H:%M")
