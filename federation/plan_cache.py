"""Plans kept for reuse, so an agent's loop of the same statement is checked and planned once.

Entries are keyed by (session, statement text, parameter types) and dropped least recently
used first, past a count or past a weight (what a plan holds grows with its text: a short
statement whose CTEs read each other twice over plans to megabytes). Each belongs to a
generation of what plans depend on (which connector and table each dataset reads, which
datasets exist, their schemas, the functions registered): when the generation moves on, every
entry planned before is forgotten, and a plan made while it moved is not kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Hashable

DEFAULT_ENTRIES = 512
DEFAULT_WEIGHT = 8_000_000  # characters of kept plans' text, about 250 MB held


@dataclass
class PlanCacheStats:
    statements_planned: int = 0  # statements checked and planned from their text
    bindings_planned: int = 0    # first binding of a planned statement with new parameter types
    hits: int = 0                # plans answered from the cache
    evictions: int = 0
    invalidations: int = 0       # times every entry was dropped because what plans depend on changed


class PlanCache:
    def __init__(self, entries: int = DEFAULT_ENTRIES, weight: int = DEFAULT_WEIGHT):
        self.capacity = entries
        self.max_weight = weight
        self.stats = PlanCacheStats()
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._weight = 0
        self._generation = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, generation: int) -> Any | None:
        with self._lock:
            self._catch_up(generation)
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return found[0]

    def put(self, key: Hashable, generation: int, entry: Any, weight: int = 0) -> None:
        """Keep ``entry``, planned in ``generation`` (unless that generation has passed), weighing
        ``weight`` (its plan's text, in characters)."""
        if self.capacity <= 0 or weight > self.max_weight:
            return
        with self._lock:
            self._catch_up(generation)
            if generation != self._generation:
                return
            if key in self._entries:
                self._weight -= self._entries.pop(key)[1]
            self._entries[key] = (entry, weight)
            self._weight += weight
            while len(self._entries) > self.capacity or self._weight > self.max_weight:
                self._weight -= self._entries.popitem(last=False)[1][1]
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
            self._weight = 0
            self._generation = generation
