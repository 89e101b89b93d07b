"""A bounded LRU of query embeddings keyed by (model, the text's SHA-256).

Agents repeat themselves: the same question comes back within a task, and its embedding
costs more than the search it feeds. Hits and misses are counted so the effect can be seen.
A text is kept as its digest: a client's texts may be megabytes each.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np


class QueryVectorCache:
    def __init__(self, capacity: int = 4096):
        self.capacity = int(capacity)
        self.hits = 0
        self.misses = 0
        self._vectors: OrderedDict[tuple[str, bytes], Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._vectors)

    def vector(self, model: str, text: str, embed: Callable[[str], Any]) -> Any:
        """The embedding of ``text`` by ``model`` (a NumPy vector, or whatever ``embed`` makes):
        cached, or ``embed(text)`` (outside the lock, so a slow embedding never holds up other
        queries' hits)."""
        key = (model, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
        with self._lock:
            found = self._vectors.get(key)
            if found is not None:
                self._vectors.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        vector = embed(text)
        if isinstance(vector, np.ndarray):
            vector.setflags(write=False)  # shared by every later hit
        if self.capacity > 0:
            with self._lock:
                self._vectors[key] = vector
                self._vectors.move_to_end(key)
                while len(self._vectors) > self.capacity:
                    self._vectors.popitem(last=False)
        return vector
