"""Plans kept for reuse, so an agent's loop of the same statement is checked and planned once.

Entries are keyed by (session, statement text, parameter types) and dropped least recently
used first. Each belongs to a generation of what plans depend on (which connector and table
each dataset reads, which datasets exist, their schemas, the functions registered): when the
generation moves on, every entry planned before is forgotten, and a plan made while it moved
is not kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Hashable

DEFAULT_ENTRIES = 512


@dataclass
class PlanCacheStats:
    statements_planned: int = 0  # statements checked and planned from their text
    bindings_planned: int = 0    # first binding of a planned statement with new parameter types
    hits: int = 0                # plans answered from the cache
    evictions: int = 0
    invalidations: int = 0       # times every entry was dropped because what plans depend on changed


class PlanCache:
    def __init__(self, entries: int = DEFAULT_ENTRIES):
        self.capacity = entries
        self.stats = PlanCacheStats()
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, generation: int) -> Any | None:
        with self._lock:
            self._catch_up(generation)
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry

    def put(self, key: Hashable, generation: int, entry: Any) -> None:
        """Keep ``entry``, planned in ``generation`` (unless that generation has passed)."""
        if self.capacity <= 0:
            return
        with self._lock:
            self._catch_up(generation)
            if generation != self._generation:
                return
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.stats.evictions += 1

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + 1)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {**asdict(self.stats), "entries": len(self._entries)}

    def _catch_up(self, generation: int) -> None:
        if generation > self._generation:
            if self._entries:
                self.stats.invalidations += 1
            self._entries.clear()
            self._generation = generation
