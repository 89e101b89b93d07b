"""The audit log: one entry per query, whichever door it came through, kept in a bounded ring
(the system table ``flightdeck.runtime.queries``) and, when configured, as JSON lines in a
rotating file. Bound parameter values are left out unless the operator asks for them; keys
never appear, only the principal's name."""
from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import threading
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Hashable

import pyarrow as pa

QUERIES_TABLE = "queries"
QUERIES_SCHEMA = pa.schema([
    ("finished_at", pa.timestamp("us", tz="UTC")), ("principal", pa.string()), ("door", pa.string()),
    ("statement", pa.string()), ("parameters", pa.string()), ("datasets", pa.list_(pa.string())),
    ("backends", pa.list_(pa.string())),
    ("rows", pa.int64()), ("bytes", pa.int64()), ("seconds", pa.float64()), ("outcome", pa.string()),
    ("error", pa.string()),
])
REDACTED = "redacted"


@dataclass
class AuditEntry:
    principal: str
    door: str
    statement: str
    parameters: str | None        # the values as JSON when shown, "redacted: N values", or None
    datasets: list[str]
    backends: list[str]           # what each backend was asked ("label: statement"), never with values
    rows: int
    bytes: int
    seconds: float
    outcome: str
    error: str | None = None
    finished_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    grant: Hashable = None        # whose rows a principal may read: those made under its grant


# What an entry shows (the grant is only for deciding who may read it). Read field by field:
# ``dataclasses.asdict`` deep-copies the grant too, which cost more than the rest of the entry.
SHOWN_FIELDS = tuple(f.name for f in fields(AuditEntry) if f.name != "grant")


def shown(entry: AuditEntry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in SHOWN_FIELDS}


class AuditLog:
    def __init__(self, capacity: int = 10_000, path: Path | None = None, max_bytes: int = 10 * 2**20,
                 backups: int = 5, show_parameters: bool = False):
        self.show_parameters = show_parameters
        self._entries: deque[AuditEntry] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._file: logging.Logger | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                           encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._file = logging.getLogger(f"flightdeck.audit.{id(self)}")
            self._file.propagate = False
            self._file.setLevel(logging.INFO)
            self._file.addHandler(handler)

    def parameters(self, values: tuple[Any, ...] | None) -> str | None:
        if values is None:
            return None
        if self.show_parameters:
            return json.dumps(list(values), default=str)
        return f"{REDACTED}: {len(values)} value{'s' if len(values) != 1 else ''}"

    def record(self, entry: AuditEntry) -> None:
        with self._lock:
            self._entries.append(entry)
        if self._file is not None:
            line = shown(entry)
            line["finished_at"] = entry.finished_at.isoformat()
            self._file.info(json.dumps(line, default=str))

    def rows(self, visible: Callable[[AuditEntry], bool] = lambda entry: True) -> list[dict]:
        with self._lock:
            entries = [entry for entry in self._entries if visible(entry)]
        return [shown(entry) for entry in entries]

    def close(self) -> None:
        if self._file is not None:
            for handler in list(self._file.handlers):
                handler.close()
                self._file.removeHandler(handler)
