"""An approximate nearest-neighbour index (HNSW, from faiss-cpu) over consecutive labels.

Chosen over usearch and hnswlib by measurement on this project's machines
(``python -m bench.ann_choice``: build rows/s, query latency and recall@10 on the same data,
same graph settings): the fastest build and lowest latency with the best recall of the three.

The index ranks candidates; the caller rescores them exactly from its float32 vectors, so
the scores returned to a user are exact cosines and only the candidate set is approximate.
Labels are the order of insertion (0, 1, 2, ...), which is how faiss numbers vectors.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ModelError

CONNECTIVITY = 16       # graph edges per node (HNSW's M)
EXPANSION_ADD = 64      # candidates considered while inserting (efConstruction)
EXPANSION_SEARCH = 1024  # candidates considered while searching (efSearch); raised to k when k is larger
ADD_SLICE = 4096        # vectors added per lock hold: a search never waits long behind a refresh


class ApproximateIndex:
    """HNSW over unit vectors, ranked by inner product (cosine); safe to search while adding."""

    def __init__(self, dim: int, *, expansion_search: int = EXPANSION_SEARCH, index=None):
        import faiss

        self._faiss = faiss
        self.dim = int(dim)
        self.expansion_search = expansion_search
        if index is None:
            index = faiss.IndexHNSWFlat(self.dim, CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = EXPANSION_ADD
        self._index = index
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._index.ntotal

    def add(self, labels: np.ndarray, vectors: np.ndarray,
            progress: Callable[[int, int], None] | None = None) -> None:
        """Insert vectors under their labels, which must continue the index's numbering
        (``len(self)``, ``len(self) + 1``, ...); ``progress(done, total)`` after each slice."""
        labels = np.asarray(labels, np.int64)
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(labels):
            raise ModelError(f"expected {len(labels)} vectors of {self.dim} dimensions, got shape {vectors.shape}")
        if len(labels) and not np.array_equal(labels, np.arange(len(self), len(self) + len(labels))):
            raise ModelError(f"labels must continue from {len(self)}")
        for start in range(0, len(labels), ADD_SLICE):
            with self._lock:
                self._index.add(vectors[start:start + ADD_SLICE])
            if progress is not None:
                progress(min(start + ADD_SLICE, len(labels)), len(labels))

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        """Labels of (about) the k nearest vectors, nearest first."""
        if k <= 0 or len(self) == 0:
            return np.zeros(0, np.int64)
        params = self._faiss.SearchParametersHNSW(efSearch=max(self.expansion_search, k))
        with self._lock:
            _, labels = self._index.search(np.asarray(query, np.float32).reshape(1, -1), k, params=params)
        found = labels[0]
        return found[found >= 0].astype(np.int64)

    def save(self, path: Path) -> None:
        """Write the index to ``path`` atomically (a crash leaves the old file or the new one)."""
        partial = path.with_suffix(path.suffix + ".partial")
        with self._lock:
            self._faiss.write_index(self._index, str(partial))
        partial.replace(path)

    @classmethod
    def load(cls, path: Path, dim: int, expansion_search: int = EXPANSION_SEARCH) -> "ApproximateIndex | None":
        """The index kept in ``path``, or None when there is none or it does not fit ``dim``."""
        import faiss

        if not path.is_file():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            return None
        return cls(dim, expansion_search=expansion_search, index=index) if index.d == dim else None
