"""The incident, one simulated minute at a time, with the truth it leaves behind.

Order traffic grows until the single checkout replica saturates and p99 latency crosses the
alert threshold (act 1). Scaled to three replicas, latency recovers (act 2), but every replica's
PgBouncer runs in session mode and holds its own server connections: the new replicas' pools
fill up, the orders database reaches max_connections and orders fail with connection errors
(act 3). With the pooler in transaction mode, connections are shared and orders succeed again
(act 4).

Every minute is drawn from a generator seeded by (seed, minute), so the same seed and the same
actions at the same minutes give the same data, whenever the actions arrive.
"""
from __future__ import annotations

import dataclasses
import hashlib
import datetime as dt
import math
from typing import Any

import numpy as np

START = dt.datetime(2026, 11, 20, 13, 0, tzinfo=dt.timezone.utc)
CUSTOMERS = 500
FIRST_ORDER_ID = 500_001

CAPACITY_PER_REPLICA = 150      # orders a minute one checkout replica serves before it queues
BASE_P99_MS = 240.0             # p99 latency of an idle replica
POOL_SIZE = 20                  # PgBouncer default_pool_size: server connections a session-mode pool holds
POOL_GROWTH_PER_MINUTE = 4      # how fast a new replica's pool opens its server connections
OTHER_DB_CLIENTS = 14           # connections of everything else that uses the orders database
MAX_CONNECTIONS = 50            # the orders database's max_connections
TRANSACTION_POOL_PER_REPLICA = 6  # server connections a transaction-mode pool needs at this traffic
ROLLOUT_MINUTES = 2             # from a recommendation to the change serving (pods start, a config reloads)
CARD_DECLINE_RATE = 0.01        # ordinary payment failures, not part of the incident
LINES_PER_MINUTE = 1_000_000    # log line ids: minute * LINES_PER_MINUTE + the line's number in its minute

DB_ERROR = "DB_CONNECTION_FAILED"
CARD_DECLINED = "CARD_DECLINED"
POSTGRES_FATAL = "FATAL:  sorry, too many clients already"
PGBOUNCER_LOGIN_FAILED = "server login failed: FATAL sorry, too many clients already"
CLIENT_ERROR = ("could not get a database connection: ERROR: server login has been failing, "
                "try again later (server_login_retry)")


@dataclasses.dataclass(frozen=True)
class AlertRule:
    """A Grafana alert rule over one per-minute metric: firing after ``for_minutes`` above."""
    name: str
    metric: str
    threshold: float
    for_minutes: int
    summary: str

    @property
    def expression(self) -> str:
        return f"{self.metric} > {self.threshold:g} for {self.for_minutes}m"


LATENCY_RULE = AlertRule("CheckoutHighLatency", "p99_latency_ms", 1500, 2,
                         "checkout-api p99 latency above 1.5 s")
ERROR_RULE = AlertRule("CheckoutOrderErrors", "error_rate", 0.05, 2,
                       "checkout-api: more than 5% of orders fail")
RULES = (LATENCY_RULE, ERROR_RULE)


def at(minute: float) -> dt.datetime:
    return START + dt.timedelta(minutes=minute)


@dataclasses.dataclass
class Truth:
    """What really happened, as the simulator played it: what the agent's findings must match."""
    seed: int
    alert_at: dt.datetime | None = None
    alert_rule: str = LATENCY_RULE.name
    alert_expression: str = LATENCY_RULE.expression
    saturation: dict[str, Any] | None = None      # at the alert: orders/min, p99, cpu, replicas
    scaled_at: dt.datetime | None = None           # the first minute served by three replicas
    errors_alert_at: dt.datetime | None = None
    error_cause: str = "connection exhaustion: session-mode pools hold max_connections"
    first_error_at: dt.datetime | None = None
    first_postgres_line: str | None = None
    first_pgbouncer_line: str | None = None
    fixed_at: dt.datetime | None = None            # the first minute with the pool in transaction mode
    failed_orders: dict[int, int] = dataclasses.field(default_factory=dict)  # customer_id -> failed orders

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["failed_orders"] = {str(k): v for k, v in sorted(self.failed_orders.items())}
        return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in out.items()}


@dataclasses.dataclass
class State:
    """The system as the minute starts: what the actions changed, and what the pools hold."""
    replicas: int = 1
    pool_mode: str = "session"
    scale_requested_at: int | None = None   # minute the recommendation arrived
    fix_requested_at: int | None = None
    replica_started: dict[int, int] = dataclasses.field(default_factory=lambda: {1: -10_000})
    next_order_id: int = FIRST_ORDER_ID
    above: dict[str, int] = dataclasses.field(default_factory=dict)  # rule -> minutes above threshold


@dataclasses.dataclass
class Minute:
    """One simulated minute's output: rows for each source."""
    minute: int
    orders: list[dict]
    logs: list[dict]
    metrics: list[dict]


def traffic(minute: int) -> float:
    """Mean orders a minute: a lunchtime ramp that levels off."""
    return 60.0 + 5.0 * min(minute, 34) + 10.0 * math.sin(minute / 7.0)


def p99_for(utilisation: float) -> float:
    """Queueing: latency grows as 1/(1-ρ), bounded by the client timeout."""
    return min(BASE_P99_MS / max(1.0 - utilisation, 0.008), 30_000.0)


def connection_demand(state: State, minute: int) -> tuple[dict[int, int], int]:
    """Server connections each replica's pool wants now, and what else holds connections."""
    wanted = {}
    for replica, started in state.replica_started.items():
        if state.pool_mode == "transaction":
            wanted[replica] = TRANSACTION_POOL_PER_REPLICA
        else:
            wanted[replica] = min(POOL_SIZE, POOL_GROWTH_PER_MINUTE * max(minute - started, 0) + 2)
    return wanted, OTHER_DB_CLIENTS


def granted_connections(wanted: dict[int, int], others: int) -> dict[int, int]:
    """Connections the database grants: the oldest pools keep theirs, the newest get what is left."""
    free = MAX_CONNECTIONS - others
    granted = {}
    for replica in sorted(wanted):
        granted[replica] = min(wanted[replica], free)
        free -= granted[replica]
    return granted


class Incident:
    """Plays the incident minute by minute for one seed; ``truth`` fills in as it goes."""

    def __init__(self, seed: int):
        self.seed = seed
        self.state = State()
        self.truth = Truth(seed=seed)
        customers = np.random.default_rng([seed, 0])
        # A few customers order much more than others: impact is uneven, as in real shops.
        weights = customers.pareto(1.5, CUSTOMERS) + 1.0
        self.customer_weights = weights / weights.sum()

    # ---- actions (the agent's recommendations, applied by the simulator) ----

    def scale_out(self, minute: int, replicas: int = 3) -> bool:
        if self.state.scale_requested_at is not None:
            return False
        self.state.scale_requested_at = minute
        return True

    def switch_pool_mode(self, minute: int, mode: str = "transaction") -> bool:
        if self.state.fix_requested_at is not None or mode != "transaction":
            return False
        self.state.fix_requested_at = minute
        return True

    # ---- one minute ----

    def step(self, minute: int) -> Minute:
        rng = np.random.default_rng([self.seed, minute + 1])
        logs: list[dict] = []
        self._apply_actions(minute, logs)
        state = self.state
        count = int(rng.poisson(traffic(minute)))
        utilisation = min(count / (CAPACITY_PER_REPLICA * state.replicas), 0.995)
        wanted, others = connection_demand(state, minute)
        granted = granted_connections(wanted, others)
        short = {r: wanted[r] - granted[r] for r in wanted if granted[r] < wanted[r]}
        orders = self._orders(rng, minute, count, utilisation, wanted, granted)
        logs += self._order_logs(rng, minute, orders)
        logs += self._pool_logs(rng, minute, short)
        metrics = self._metrics(minute, orders, utilisation, granted, others)
        self._record(minute, orders, logs, metrics)
        for number, line in enumerate(logs):
            line["line_id"] = minute * LINES_PER_MINUTE + number
        return Minute(minute, orders, logs, metrics)

    def _apply_actions(self, minute: int, logs: list[dict]) -> None:
        state = self.state
        # A recommendation made during minute m serves from m + ROLLOUT_MINUTES on.
        if (state.scale_requested_at is not None and state.replicas == 1
                and minute >= state.scale_requested_at + ROLLOUT_MINUTES):
            state.replicas = 3
            for replica in (2, 3):
                state.replica_started[replica] = minute
            self.truth.scaled_at = at(minute)
            logs.append(_log(at(minute), "deployer", "INFO", None,
                             "scaled deployment/checkout-api from 1 to 3 replicas"))
            for replica in (2, 3):
                logs.append(_log(at(minute) + dt.timedelta(seconds=4 * replica), "checkout-api", "INFO",
                                 f"checkout-api-{replica}",
                                 f"started; connecting through pgbouncer (pool_mode=session, pool_size={POOL_SIZE})"))
        if (state.fix_requested_at is not None and state.pool_mode == "session"
                and minute >= state.fix_requested_at + ROLLOUT_MINUTES):
            state.pool_mode = "transaction"
            self.truth.fixed_at = at(minute)
            logs.append(_log(at(minute), "pgbouncer", "LOG", None,
                             "RELOAD command issued; pool_mode changed from session to transaction"))

    def _orders(self, rng: np.random.Generator, minute: int, count: int, utilisation: float,
                wanted: dict[int, int], granted: dict[int, int]) -> list[dict]:
        seconds = np.sort(rng.uniform(0, 60, count))
        customers = rng.choice(CUSTOMERS, count, p=self.customer_weights) + 1
        replicas = rng.integers(1, self.state.replicas + 1, count)
        p99 = p99_for(utilisation)
        # Latencies log-normal with the minute's p99 at the 99th percentile.
        latency = np.exp(rng.normal(0.0, 0.45, count)) * p99 / math.exp(0.45 * 2.326)
        no_connection = rng.random(count)
        declined = rng.random(count) < CARD_DECLINE_RATE
        amounts = np.round(rng.gamma(2.0, 35.0, count) + 5.0, 2)
        rows = []
        for i in range(count):
            replica = int(replicas[i])
            missing = 1.0 - granted[replica] / wanted[replica]
            if no_connection[i] < missing:
                status, error, ms = "failed", DB_ERROR, 40 + int(latency[i] % 60)
            elif declined[i]:
                status, error, ms = "failed", CARD_DECLINED, int(latency[i])
            else:
                status, error, ms = "completed", None, int(latency[i])
            rows.append({"order_id": self.state.next_order_id + i, "customer_id": int(customers[i]),
                         "created_at": at(minute) + dt.timedelta(seconds=float(seconds[i])),
                         "status": status, "amount": float(amounts[i]), "latency_ms": ms,
                         "replica": f"checkout-api-{replica}", "error_code": error})
        self.state.next_order_id += count
        return rows

    def _order_logs(self, rng: np.random.Generator, minute: int, orders: list[dict]) -> list[dict]:
        logs = []
        for order in orders:
            ts = order["created_at"] + dt.timedelta(milliseconds=order["latency_ms"])
            if order["error_code"] == DB_ERROR:
                logs.append(_log(ts, "checkout-api", "ERROR", order["replica"],
                                 f"order {order['order_id']} failed: {CLIENT_ERROR}", order["order_id"]))
            elif order["error_code"] == CARD_DECLINED:
                logs.append(_log(ts, "payments", "WARNING", None,
                                 f"card declined for order {order['order_id']}", order["order_id"]))
            else:
                logs.append(_log(ts, "checkout-api", "INFO", order["replica"],
                                 f"order {order['order_id']} completed in {order['latency_ms']} ms",
                                 order["order_id"]))
        return logs

    def _pool_logs(self, rng: np.random.Generator, minute: int, short: dict[int, int]) -> list[dict]:
        """Each refused server login, as the database and the pooler each log it."""
        logs = []
        for replica, missing in sorted(short.items()):
            for attempt in range(min(missing, 6)):
                ts = at(minute) + dt.timedelta(seconds=float(rng.uniform(0, 59)))
                pid = int(rng.integers(20_000, 60_000))
                logs.append(_log(ts, "orders-db", "FATAL", None, f"[{pid}] {POSTGRES_FATAL}"))
                logs.append(_log(ts + dt.timedelta(milliseconds=2), "pgbouncer", "WARNING", f"checkout-api-{replica}",
                                 f"S-0x{int(rng.integers(0x5500_0000, 0x55ff_ffff)):x}: orders/checkout@10.20.0.5:5432 "
                                 f"{PGBOUNCER_LOGIN_FAILED}"))
        return logs

    def _metrics(self, minute: int, orders: list[dict], utilisation: float, granted: dict[int, int],
                 others: int) -> list[dict]:
        latencies = [o["latency_ms"] for o in orders if o["error_code"] != DB_ERROR] or [0]
        failed = sum(o["error_code"] == DB_ERROR for o in orders)
        samples = [
            ("checkout-api", "orders_per_min", len(orders)),
            ("checkout-api", "p99_latency_ms", round(float(np.percentile(latencies, 99)), 1)),
            ("checkout-api", "error_rate", round(failed / max(len(orders), 1), 4)),
            ("checkout-api", "cpu_utilization", round(min(utilisation, 1.0) * 100, 1)),
            ("checkout-api", "replicas", self.state.replicas),
            ("pgbouncer", "server_connections", sum(granted.values())),
            ("pgbouncer", "transaction_pooling", 1 if self.state.pool_mode == "transaction" else 0),
            ("orders-db", "active_connections", sum(granted.values()) + others),
            ("orders-db", "max_connections", MAX_CONNECTIONS),
        ]
        return [{"ts": at(minute), "service": s, "metric": m, "value": float(v)} for s, m, v in samples]

    # ---- the truth ----

    def _record(self, minute: int, orders: list[dict], logs: list[dict], metrics: list[dict]) -> None:
        truth = self.truth
        values = {row["metric"]: row["value"] for row in metrics}
        for rule in RULES:
            above = values[rule.metric] > rule.threshold
            self.state.above[rule.name] = self.state.above.get(rule.name, 0) + 1 if above else 0
        if truth.alert_at is None and self.state.above[LATENCY_RULE.name] >= LATENCY_RULE.for_minutes:
            truth.alert_at = at(minute)
            truth.saturation = {"orders_per_min": values["orders_per_min"], "p99_latency_ms": values["p99_latency_ms"],
                                "cpu_utilization": values["cpu_utilization"], "replicas": int(values["replicas"])}
        if truth.errors_alert_at is None and self.state.above[ERROR_RULE.name] >= ERROR_RULE.for_minutes:
            truth.errors_alert_at = at(minute)
        for order in orders:
            if order["error_code"] == DB_ERROR:
                truth.failed_orders[order["customer_id"]] = truth.failed_orders.get(order["customer_id"], 0) + 1
        if truth.first_error_at is None:
            fatal = sorted((r for r in logs if r["service"] in ("orders-db", "pgbouncer")
                            and "too many clients" in r["message"]), key=lambda r: r["ts"])
            if fatal:
                truth.first_error_at = fatal[0]["ts"]
                truth.first_postgres_line = next(r["message"] for r in fatal if r["service"] == "orders-db")
                truth.first_pgbouncer_line = next(r["message"] for r in fatal if r["service"] == "pgbouncer")

    def firing(self, minute: int) -> list[dict]:
        """The alerts firing at the end of ``minute``, as Grafana's Alertmanager API lists them."""
        out = []
        for rule in RULES:
            above = self.state.above.get(rule.name, 0)
            if above >= rule.for_minutes:
                started = at(minute - above + rule.for_minutes)
                out.append({
                    "labels": {"alertname": rule.name, "service": "checkout-api", "severity": "critical",
                               "grafana_folder": "checkout"},
                    "annotations": {"summary": rule.summary, "expression": rule.expression},
                    "startsAt": started.isoformat().replace("+00:00", "Z"),
                    "endsAt": (at(minute) + dt.timedelta(minutes=4)).isoformat().replace("+00:00", "Z"),
                    "updatedAt": at(minute).isoformat().replace("+00:00", "Z"),
                    "fingerprint": hashlib.sha256(rule.name.encode()).hexdigest()[:16],
                    "status": {"state": "active", "silencedBy": [], "inhibitedBy": []},
                    "receivers": [{"name": "sre-oncall"}],
                    "generatorURL": f"http://grafana.local/alerting/grafana/{rule.name}/view",
                })
        return out


def _log(ts: dt.datetime, service: str, level: str, replica: str | None, message: str,
         order_id: int | None = None) -> dict:
    return {"ts": ts, "service": service, "level": level, "replica": replica, "message": message,
            "order_id": order_id}


def customers(seed: int) -> list[dict]:
    """The CRM's customers (names and emails deterministic for the seed)."""
    from flightdeck.demo import FIRST, LAST, COUNTRIES
    rng = np.random.default_rng([seed, 1])
    first, last = rng.choice(FIRST, CUSTOMERS), rng.choice(LAST, CUSTOMERS)
    tiers = rng.choice(["free", "pro", "enterprise"], CUSTOMERS, p=[0.6, 0.3, 0.1])
    countries = rng.choice(COUNTRIES, CUSTOMERS)
    return [{"customer_id": i + 1, "name": f"{first[i]} {last[i]}",
             "email": f"{first[i].lower()}.{last[i].lower()}{i + 1}@example.com",
             "tier": str(tiers[i]), "country": str(countries[i])} for i in range(CUSTOMERS)]
