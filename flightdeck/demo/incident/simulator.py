"""Plays the incident live, in compressed time: every ``seconds_per_minute`` one simulated
minute of orders (to the orders database), logs and metrics (files) and alerts (the control
server) is written, and the recommendations the agent sends are applied as a rollout would.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from flightdeck.demo.incident import model, sources
from flightdeck.demo.incident.control import ControlServer

log = logging.getLogger("flightdeck.demo.incident")

GRANTED = ["orders", "crm.customers", "logs", "metrics", "alerts", "guides"]
ALERT_COLUMNS = {"labels_alertname": "string", "labels_service": "string", "labels_severity": "string",
                 "annotations_summary": "string", "annotations_expression": "string", "status_state": "string",
                 "startsAt": "timestamp", "updatedAt": "timestamp", "fingerprint": "string"}
GUIDE_COLUMNS = [{"name": "content",
                  "embeddings": [{"from": "minilm",
                                  "chunking": {"enabled": True, "target_chunk_size": 800, "overlap_size": 100}}],
                  "full_text_search": {"enabled": True}}]


class Simulator:
    """One incident for one seed under ``workdir``; ``prepare()``, ``start()``, ``close()``."""

    def __init__(self, workdir: Path, seed: int, orders_db: sources.OrdersDatabase,
                 seconds_per_minute: float = 1.0, history_minutes: int = 8, tail_minutes: int = 10,
                 max_minutes: int = 150):
        self.workdir = Path(workdir)
        self.data = self.workdir / "data"
        self.seed = seed
        self.orders_db = orders_db
        self.seconds_per_minute = seconds_per_minute
        self.history_minutes = history_minutes
        self.tail_minutes = tail_minutes
        self.max_minutes = max_minutes
        self.incident = model.Incident(seed)
        self.minute = -1                      # the last minute written
        self.recommendations: list[dict] = []
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._alerts: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.control: ControlServer | None = None

    @property
    def truth(self) -> model.Truth:
        return self.incident.truth

    # ---- setting up ----

    def prepare(self) -> None:
        """The sources as they are when the on-call agent starts: customers, a few quiet minutes."""
        sources.reset(self.data)
        self.orders_db.create(model.customers(self.seed))
        sources.write_guides_repository(self.data / "guides")
        sources.write_oncall(self.data / "oncall.csv")
        for minute in range(self.history_minutes):
            self._play(minute)
        self.control = ControlServer(self._current_alerts, self._recommend)

    def config(self, agent_key: str, operator_key: str, refresh_interval: float | None = None,
               audit_log: Path | None = None) -> dict[str, Any]:
        """flightdeck's configuration for this incident: the agent's key sees only the incident's
        datasets, and customers' emails only hashed."""
        every = f"{refresh_interval or max(0.1, self.seconds_per_minute / 3):g}s"
        orders, customers = self.orders_db.datasets()
        appended = {"enabled": True, "engine": "duckdb", "refresh_mode": "append", "refresh_check_interval": every}
        agent: dict[str, Any] = {"name": "sre-agent", "key": agent_key, "datasets": GRANTED,
                                 "masks": {"crm.customers": {"email": "hash"}}}
        auth: dict[str, Any] = {"api_keys": [agent, {"name": "operator", "key": operator_key, "refresh": True}],
                                "mask_key": secrets.token_hex(16)}  # a run's own: its hashes join within the run only
        runtime: dict[str, Any] = {"auth": auth}
        if audit_log is not None:
            runtime["audit"] = {"log": str(audit_log)}
        return {
            "version": "v1", "kind": "Flightdeck", "name": f"incident-{self.seed}",
            "datasets": [
                {**orders, "name": "orders", "description": "Orders (the orders database)", "time_column": "created_at",
                 "acceleration": {**appended, "primary_key": "order_id"}},
                {**customers, "name": "crm.customers", "description": "Customers from the CRM",
                 "acceleration": {"enabled": True, "engine": "duckdb"}},
                # A line is stamped when its order ends, so a minute's file holds lines of the next
                # minute too: each append re-reads two minutes back and keeps each line once.
                {"from": "file:data/logs/", "name": "logs", "time_column": "ts",
                 "acceleration": {**appended, "primary_key": "line_id", "refresh_append_overlap": "2m"},
                 "description": "Logs of checkout-api, pgbouncer, orders-db, payments, deployer"},
                {"from": "file:data/metrics/", "name": "metrics", "time_column": "ts", "acceleration": appended,
                 "description": "Per-minute metrics: service, metric, value"},
                {"from": self.control.alerts_url, "name": "alerts", "description": "Grafana alerts (Alertmanager API)",
                 "params": {"columns": ALERT_COLUMNS}},
                {"from": "git:data/guides/files", "name": "guides", "description": "Troubleshooting guides (git)",
                 "acceleration": {"enabled": True, "engine": "duckdb"}, "columns": GUIDE_COLUMNS},
                {"from": "file:data/oncall.csv", "name": "hr.oncall", "description": "On-call roster"},
            ],
            "runtime": runtime,
        }

    # ---- playing ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="incident-simulator", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        began = time.monotonic()
        first = self.history_minutes
        try:
            for minute in range(first, self.max_minutes):
                due = began + (minute - first + 1) * self.seconds_per_minute
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return
                self._play(minute)
                fixed = self.truth.fixed_at
                if fixed is not None and model.at(minute) >= fixed + dt.timedelta(minutes=self.tail_minutes):
                    return
        except Exception:  # a failed write ends the play; say why where the operator looks
            log.exception("the incident simulator stopped")
        finally:
            self.finished.set()

    def _play(self, minute: int) -> None:
        played = self.incident.step(minute)
        self.orders_db.insert_orders(played.orders)
        sources.write_part(played.logs, sources.LOGS_SCHEMA, self.data / "logs", minute)
        sources.write_part(played.metrics, sources.METRICS_SCHEMA, self.data / "metrics", minute)
        with self._lock:
            self.minute = minute
            self._alerts = self.incident.firing(minute)

    def _current_alerts(self) -> list[dict]:
        with self._lock:
            return list(self._alerts)

    def _recommend(self, body: dict) -> dict:
        """Apply a recommendation (a rollout: it serves ``ROLLOUT_MINUTES`` later); what was decided."""
        with self._lock:
            minute = self.minute
            action = body.get("action")
            if action == "scale_out":
                accepted = self.incident.scale_out(minute, int(body.get("replicas", 3)))
            elif action == "set_pool_mode":
                accepted = self.incident.switch_pool_mode(minute, str(body.get("mode")))
            else:
                return {"error": f"unknown action {action!r}: use scale_out or set_pool_mode"}
            self.recommendations.append({**body, "minute": minute, "accepted": accepted})
        log.info("recommendation %s at %s: %s", json.dumps(body), model.at(minute).isoformat(),
                 f"serving in {model.ROLLOUT_MINUTES} minutes" if accepted else "already applied")
        return {"accepted": accepted, "effective_at": sources.iso(model.at(minute + model.ROLLOUT_MINUTES))}

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.control is not None:
            self.control.close()
        self.orders_db.close()
