"""The embedded vectors of one searchable column, kept in step with its accelerated copy.

Each distinct chunk text has a slot: its embedding, computed once (the cache, on disk for
file-mode copies, keyed by the hash of model and text). A copy is searched through a
``VectorSnapshot``: exact search over its chunks, and for columns with at least
``approximate_above`` chunks an HNSW index over the slots.

The approximate index indexes every slot. A refresh adds the slots of texts it brought to
the live index (an append adds only its new rows); a refresh that leaves more than a quarter
of the slots unused (typically a full replace with new data) compacts the slots and builds a
new index beside the live one, which serves until the new copy is swapped in. For file-mode
copies the index is saved beside the cache and reloaded at start when it still matches it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from inference.ann import EXPANSION_SEARCH, ApproximateIndex
from inference.embedder import TextEmbedder
from inference.search import SearchResult, VectorIndex

log = logging.getLogger("flightdeck.search")
EMBED_SLICE = 2048  # texts per embedder call while indexing: progress can be reported between them
PROGRESS_EVERY_SECONDS = 5.0
STALE_SHARE = 0.25  # unused slots past this share of all slots: compact and rebuild beside
OVERFETCH = 1.5     # approximate candidates fetched per result wanted (unused slots and ties)
MAX_FETCH = 2000    # a filter so selective that more would be needed is searched exactly


@dataclass(frozen=True)
class VectorSnapshot:
    """One copy's vector search: chunk positions in, chunk positions out."""
    exact: VectorIndex                  # over the copy's chunks, by position
    approximate: ApproximateIndex | None  # over slots; None: exact search only
    slots_sorted: np.ndarray            # the chunks' slots, sorted
    chunks_by_slot: np.ndarray          # chunk positions in the same order

    @classmethod
    def of(cls, matrix: np.ndarray, chunk_slots: np.ndarray, approximate: ApproximateIndex | None) -> "VectorSnapshot":
        order = np.argsort(chunk_slots, kind="stable")
        return cls(VectorIndex(matrix[chunk_slots]), approximate, chunk_slots[order], order.astype(np.int64))

    def search(self, query: np.ndarray, depth: int, candidates: np.ndarray | None) -> SearchResult:
        """The best ``depth`` chunks (of ``candidates``, chunk positions, when given), with
        exact cosine scores. A filter too selective for the approximate index to find
        ``depth`` matches among its nearest neighbours is searched exactly over its chunks."""
        if self.approximate is None:
            return self.exact.search(query, depth, candidates=candidates)
        wanted = len(self.exact) if candidates is None else len(candidates)
        fetch = math.ceil(depth * OVERFETCH * len(self.exact) / max(wanted, 1))
        if fetch > MAX_FETCH:
            return self.exact.search(query, depth, candidates=candidates)
        chunks = self._chunks_of(self.approximate.search(query, fetch))
        if candidates is not None:  # a lookup table, not a sort of every matching chunk
            chunks = chunks[np.isin(chunks, candidates, kind="table")]
        result = self.exact.search(query, depth, candidates=chunks)
        if len(result) < min(depth, wanted):  # unused slots or a filter took too many: be exact
            return self.exact.search(query, depth, candidates=candidates)
        return result

    def _chunks_of(self, slots: np.ndarray) -> np.ndarray:
        """Every chunk holding one of these slots (a text may occur in several rows)."""
        starts = np.searchsorted(self.slots_sorted, slots, side="left")
        ends = np.searchsorted(self.slots_sorted, slots, side="right")
        if len(slots) and (ends - starts).max(initial=0) <= 1:
            return self.chunks_by_slot[starts[ends > starts]]
        return np.concatenate([self.chunks_by_slot[s:e] for s, e in zip(starts, ends)] or [np.zeros(0, np.int64)])


class ColumnVectors:
    """The slots of one column and the approximate index over them."""

    def __init__(self, label: str, model: str, embedder: Callable[[], TextEmbedder],
                 cache_file: Path | None, approximate_above: int, ef_search: int = EXPANSION_SEARCH):
        self.label = label
        self.model = model
        self._embedder = embedder
        self.cache_file = cache_file
        self.approximate_above = approximate_above
        self.ef_search = ef_search
        self._keys: list[bytes] = []
        self._slot_of: dict[bytes, int] = {}
        self._matrix = np.zeros((0, 0), np.float32)  # rows past len(self._keys) are spare capacity
        self._approximate: ApproximateIndex | None = None
        self.embedded_last = 0     # chunks embedded by the last update (the rest came from the cache)
        self.embedded_total = 0
        self.index_added_last = 0  # slots the last update added to the approximate index
        self.index_builds = 0      # approximate indexes built from scratch (at start or beside a live one)
        self.index_loaded = False  # the approximate index was read from disk at start
        self._load()

    @property
    def approximate(self) -> ApproximateIndex | None:
        return self._approximate

    # ---- updating -------------------------------------------------------------

    def update(self, texts: list[str]) -> VectorSnapshot:
        """Vectors for a new copy's chunk texts: embeds the texts never seen, brings the
        approximate index up to date, and returns what searches of the copy use."""
        keys = [hashlib.sha256(f"{self.model}\0{t}".encode()).digest() for t in texts]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self._slot_of}.values())
        if missing:
            log.info("%s: embedding %s chunks (%s already embedded)", self.label,
                     f"{len(missing):,}", f"{len(keys) - len(missing):,}")
            self._embed_missing([texts[i] for i in missing], [keys[i] for i in missing])
        self.embedded_last = len(missing)
        self.embedded_total += len(missing)
        chunk_slots = np.fromiter((self._slot_of[k] for k in keys), np.int64, len(keys))
        used = np.unique(chunk_slots)
        compacted = len(self._keys) - len(used) > STALE_SHARE * len(self._keys)
        if compacted:
            chunk_slots = self._compact(used, chunk_slots)
        self._index(len(keys) >= self.approximate_above, rebuild=compacted)
        if missing or compacted:
            self._save_cache()
        return VectorSnapshot.of(self._matrix[:len(self._keys)], chunk_slots, self._approximate)

    def unchanged(self) -> None:
        """The copy came back with the same texts: its snapshot stays, nothing was embedded or added."""
        self.embedded_last = 0
        self.index_added_last = 0

    def _embed_missing(self, texts: list[str], keys: list[bytes]) -> None:
        """Embed in slices, with a progress line every few seconds (100k rows take minutes)."""
        started = last_report = time.monotonic()
        for start in range(0, len(texts), EMBED_SLICE):
            fresh = self._embedder().embed_numpy(texts[start:start + EMBED_SLICE])
            self._append(keys[start:start + EMBED_SLICE], fresh)
            done, now = min(start + EMBED_SLICE, len(texts)), time.monotonic()
            if now - last_report >= PROGRESS_EVERY_SECONDS and done < len(texts):
                last_report = now
                log.info("%s: embedded %s of %s chunks (%.0f/s)", self.label,
                         f"{done:,}", f"{len(texts):,}", done / (now - started))

    def _append(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """New slots at the end; the matrix grows by doubling, so snapshots taken before keep
        reading the array they were given."""
        count = len(self._keys)
        if count + len(keys) > len(self._matrix) or self._matrix.shape[1] != vectors.shape[1]:
            grown = np.zeros((max(2 * len(self._matrix), count + len(keys)), vectors.shape[1]), np.float32)
            if count:
                grown[:count] = self._matrix[:count]
            self._matrix = grown
        self._matrix[count:count + len(keys)] = vectors
        for offset, key in enumerate(keys):
            self._slot_of[key] = count + offset
        self._keys.extend(keys)

    def _compact(self, used: np.ndarray, chunk_slots: np.ndarray) -> np.ndarray:
        """Forget the slots no chunk uses; returns the chunks' renumbered slots."""
        self._keys = [self._keys[s] for s in used.tolist()]
        self._slot_of = {key: slot for slot, key in enumerate(self._keys)}
        self._matrix = self._matrix[used]
        return np.searchsorted(used, chunk_slots)

    def _index(self, wanted: bool, rebuild: bool) -> None:
        """Bring the approximate index up to every slot: a new one beside the live one when
        asked to rebuild (or there is none), the live one extended otherwise."""
        if not wanted:
            self._approximate = None
            return
        count = len(self._keys)
        index = None if rebuild else self._approximate
        if index is None:
            index = ApproximateIndex(self._matrix.shape[1], expansion_search=self.ef_search)
            self.index_builds += 1
        start = len(index)
        self.index_added_last = count - start
        if count > start:
            log.info("%s: adding %s vectors to the approximate index", self.label, f"{count - start:,}")
            started = time.monotonic()
            index.add(np.arange(start, count), self._matrix[start:count], self._progress(started))
            log.info("%s: approximate index of %s vectors ready (%.0f vectors/s)", self.label,
                     f"{count:,}", (count - start) / max(time.monotonic() - started, 1e-9))
        self._approximate = index
        if count > start:
            self._save_index()

    def _progress(self, started: float) -> Callable[[int, int], None]:
        last = [started]

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_SECONDS and done < total:
                last[0] = now
                log.info("%s: indexed %s of %s vectors (%.0f/s)", self.label, f"{done:,}", f"{total:,}",
                         done / (now - started))
        return report

    # ---- on disk (file-mode copies) -------------------------------------------

    @property
    def _index_file(self) -> Path | None:
        return None if self.cache_file is None else self.cache_file.with_suffix(".hnsw")

    def _fingerprint(self) -> str:
        """What an approximate index on disk must have been built from: these slots, in order."""
        digest = hashlib.sha256()
        for key in self._keys:
            digest.update(key)
        return json.dumps({"slots": len(self._keys), "keys": digest.hexdigest()})

    def _load(self) -> None:
        if self.cache_file is None or not self.cache_file.exists():
            return
        try:
            table = pa.ipc.open_file(self.cache_file).read_all()
        except (pa.ArrowInvalid, OSError) as error:
            log.warning("ignoring the embedding cache %s: %s", self.cache_file, error)
            return
        vectors = table.column("vector").combine_chunks()
        if len(vectors):
            self._append(table.column("key").to_pylist(),
                         vectors.values.to_numpy(zero_copy_only=False).reshape(len(vectors), vectors.type.list_size))
        self._approximate = self._load_index()
        self.index_loaded = self._approximate is not None

    def _load_index(self) -> ApproximateIndex | None:
        """The approximate index kept on disk, if it was built from exactly these slots."""
        path = self._index_file
        stamp = path.with_suffix(".hnsw.json")
        if not (self._keys and path.is_file() and stamp.is_file()) or stamp.read_text() != self._fingerprint():
            return None
        index = ApproximateIndex.load(path, self._matrix.shape[1], self.ef_search)
        if index is None or len(index) != len(self._keys):
            log.warning("%s: ignoring the approximate index %s (it does not match the cache)", self.label, path.name)
            return None
        log.info("%s: approximate index of %s vectors loaded", self.label, f"{len(index):,}")
        return index

    def _save_cache(self) -> None:
        if self.cache_file is None:
            return
        matrix = self._matrix[:len(self._keys)]
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), max(matrix.shape[1], 1))
        table = pa.table({"key": pa.array(self._keys, pa.binary()), "vector": vectors})
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.cache_file.with_suffix(".partial")
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        partial.replace(self.cache_file)  # atomic: a crash leaves the old cache or the new one
        if self._approximate is None and self._index_file.exists():
            self._index_file.unlink()  # it indexes slots that no longer exist

    def _save_index(self) -> None:
        if self._index_file is None:
            return
        self._index_file.parent.mkdir(parents=True, exist_ok=True)
        stamp = self._index_file.with_suffix(".hnsw.json")
        stamp.unlink(missing_ok=True)  # never a stamp beside an index it does not describe
        self._approximate.save(self._index_file)
        stamp.write_text(self._fingerprint())
