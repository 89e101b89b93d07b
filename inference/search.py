"""Vector, full-text and hybrid ranking over rows identified by int64 row ids.

The indexes know nothing about tables: the caller (the accelerated store) owns the rows and
passes row ids in, and gets (row_id, score) rankings back. A WHERE clause is applied first
and handed over as a candidate set, so filtering never drops results that ranking kept
(the "top 10, then filter, 3 left" problem of post-filtering).

VectorIndex is exact brute force: a [rows, dim] float32 matrix times the query. At 384
dimensions that is ~1 ms per 10k rows on one core, which beats building an approximate
index for the table sizes an agent's local store holds, and it is always exact.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from .errors import ModelError

Candidates = np.ndarray | pa.Array | pa.ChunkedArray | Iterable[int] | None
GATHER_ROWS = 1024  # candidate rows scored per block (1.5 MB at 384 dimensions; 512 to 2,048 measured alike)


@dataclass(frozen=True)
class SearchResult:
    """A ranking, best first: parallel arrays of row ids and scores (higher is better)."""
    row_ids: np.ndarray   # int64
    scores: np.ndarray    # float32 (vector, text) or float64 (fusion)

    def __len__(self) -> int:
        return len(self.row_ids)

    def pairs(self) -> list[tuple[int, float]]:
        return list(zip(self.row_ids.tolist(), self.scores.tolist()))

    def to_arrow(self) -> pa.Table:
        return pa.table({"row_id": pa.array(self.row_ids, pa.int64()), "score": pa.array(self.scores)})


def _empty_result() -> SearchResult:
    return SearchResult(np.zeros(0, np.int64), np.zeros(0, np.float32))


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> SearchResult:
    """Best k by score; ties broken by smaller row id so results are deterministic."""
    keep = np.isfinite(scores)
    if not keep.all():
        scores, ids = scores[keep], ids[keep]
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
        # argpartition picks arbitrarily among rows tied with the k-th score; include all
        # of them so the tie-break below sees every contender.
        threshold = scores[part].min()
        part = np.flatnonzero(scores >= threshold)
        scores, ids = scores[part], ids[part]
    order = np.lexsort((ids, -scores))[:k]
    return SearchResult(ids[order].astype(np.int64, copy=False), scores[order])


# --------------------------------------------------------------------------- vectors

class VectorIndex:
    """Exact cosine similarity search over a FixedSizeList<float> column."""

    def __init__(self, vectors: pa.FixedSizeListArray | pa.ChunkedArray | np.ndarray,
                 row_ids: pa.Array | pa.ChunkedArray | np.ndarray | Sequence[int] | None = None):
        """row_ids: one id per vector; default 0..n-1 (the row's position)."""
        matrix, valid = _matrix(vectors)
        n = matrix.shape[0]
        if row_ids is None:
            ids = np.arange(n, dtype=np.int64)
        else:
            ids = _int64(row_ids)
            if len(ids) != n:
                raise ModelError(f"{n} vectors but {len(ids)} row ids")
        norms = np.linalg.norm(matrix, axis=1)
        valid &= norms > 0  # a zero vector has no direction: never a match
        # Normalise once here so each search is a single matrix-vector product.
        self._matrix = np.divide(matrix, np.where(valid, norms, 1)[:, None], dtype=np.float32)
        self._valid = valid
        self._ids = ids
        self._identity = row_ids is None
        self._sorted_pos = None if self._identity else np.argsort(ids, kind="stable")

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def dim(self) -> int:
        return self._matrix.shape[1]

    def search(self, query: np.ndarray | Sequence[float] | pa.Array, k: int = 10, *,
               candidates: Candidates = None) -> SearchResult:
        """Top-k rows by cosine similarity to `query`.

        candidates: restrict ranking to these rows, either a boolean mask aligned with the
        vectors (e.g. a WHERE clause evaluated on the same batch) or a collection of row ids.
        """
        q = _query_vector(query, self.dim)
        if k <= 0 or len(self) == 0:
            return _empty_result()
        positions = self._positions(candidates)
        if positions is None:
            scores = self._matrix @ q
            scores[~self._valid] = -np.inf
            return _top_k(scores, self._ids, k)
        positions = positions[self._valid[positions]]
        if len(positions) == 0:
            return _empty_result()
        # Gathering the candidate rows copies them; for up to half of the rows that is cheaper
        # than scoring every row, for more the full product plus a mask is.
        if len(positions) < len(self) // 2:
            scores = self._gathered_scores(positions, q)
        else:
            scores = (self._matrix @ q)[positions]
        return _top_k(scores, self._ids[positions], k)

    def _gathered_scores(self, positions: np.ndarray, q: np.ndarray) -> np.ndarray:
        """The scores of these rows, copied out a block at a time so that each block is still in
        cache for its product (one copy of every matching row goes out to memory and back: at 1M
        rows with one in eight kept, 55 ms, in blocks 24)."""
        scores = np.empty(len(positions), np.float32)
        block = np.empty((min(GATHER_ROWS, len(positions)), self.dim), np.float32)
        for start in range(0, len(positions), GATHER_ROWS):
            rows = positions[start:start + GATHER_ROWS]
            # the rows are in range; numpy buffers an `out` under the default mode="raise"
            np.take(self._matrix, rows, axis=0, out=block[:len(rows)], mode="clip")
            scores[start:start + len(rows)] = block[:len(rows)] @ q
        return scores

    def _positions(self, candidates: Candidates) -> np.ndarray | None:
        if candidates is None:
            return None
        arr = _candidate_array(candidates)
        if arr.dtype == np.bool_:
            if len(arr) != len(self):
                raise ModelError(f"candidate mask has {len(arr)} entries for {len(self)} vectors")
            return np.flatnonzero(arr)
        if self._identity:
            inside = arr[(arr >= 0) & (arr < len(self))]
            # a filter's matching rows come sorted; numpy's unique would hash them all again
            # (10 ms for 125,000 ids)
            return inside if _strictly_increasing(inside) else np.unique(inside)
        # Map ids to positions through the sorted ids; ids not in the index drop out.
        sorted_ids = self._ids[self._sorted_pos]
        slots = np.minimum(np.searchsorted(sorted_ids, arr), len(sorted_ids) - 1)
        found = sorted_ids[slots] == arr
        return np.unique(self._sorted_pos[slots[found]])


def _strictly_increasing(ids: np.ndarray) -> bool:
    return len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())


def _candidate_array(candidates: Candidates) -> np.ndarray:
    """A boolean mask or an int64 array of row ids (nulls dropped / treated as False)."""
    if isinstance(candidates, pa.ChunkedArray):
        candidates = candidates.combine_chunks()
    if isinstance(candidates, pa.Array):
        if pa.types.is_boolean(candidates.type):
            return candidates.fill_null(False).to_numpy(zero_copy_only=False)
        return candidates.drop_null().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if isinstance(candidates, np.ndarray):
        return candidates if candidates.dtype == np.bool_ else candidates.astype(np.int64, copy=False)
    return np.fromiter(candidates, np.int64)


def _matrix(vectors) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, dim] matrix, validity mask) from Arrow or numpy vectors."""
    if isinstance(vectors, np.ndarray):
        if vectors.ndim != 2:
            raise ModelError(f"vectors must be 2-D, got shape {vectors.shape}")
        return vectors.astype(np.float32, copy=False), np.ones(len(vectors), np.bool_)
    if isinstance(vectors, pa.ChunkedArray):
        vectors = vectors.combine_chunks() if vectors.num_chunks != 1 else vectors.chunk(0)
    if not pa.types.is_fixed_size_list(vectors.type):
        raise ModelError(f"a vector column must be FixedSizeList<float>, got {vectors.type}")
    dim = vectors.type.list_size
    values = vectors.values.slice(vectors.offset * dim, len(vectors) * dim)
    if values.null_count:
        raise ModelError("vector column has null elements inside a vector")
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(vectors), dim)
    valid = vectors.is_valid().to_numpy(zero_copy_only=False) if vectors.null_count else np.ones(len(vectors), np.bool_)
    return matrix, valid.copy()


def _query_vector(query, dim: int) -> np.ndarray:
    if isinstance(query, pa.FixedSizeListArray):
        if len(query) != 1:
            raise ModelError("pass one query vector")
        query = query.values.to_numpy(zero_copy_only=False)
    elif isinstance(query, pa.Array):
        query = query.to_numpy(zero_copy_only=False)
    q = np.asarray(query, np.float32).reshape(-1)
    if q.shape[0] != dim:
        raise ModelError(f"query has {q.shape[0]} dimensions, the index {dim}")
    norm = np.linalg.norm(q)
    return q / norm if norm > 0 else q


def _int64(values) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        if values.null_count:
            raise ModelError("row ids must not be null")
        values = values.to_numpy(zero_copy_only=False)
    return np.asarray(values).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- full text

# Characters with a meaning in tantivy's query language; "plain" queries treat them as spaces
# so text an agent pastes ("replicas: too many") is searched for, not parsed.
_QUERY_SYNTAX = re.compile(r"""[+\-&|!(){}\[\]^"~*?:\\/<>=']""")


class TextIndex:
    """BM25 full-text index (tantivy) of (row_id, text), updatable by row id.

    tokenizer: a tantivy tokenizer name; "en_stem" (lower case, English stemming) by
    default, "default" for no stemming. path: a folder to persist the index in (opened if
    it already holds one); None keeps it in memory.
    """

    def __init__(self, path: str | Path | None = None, *, tokenizer: str = "en_stem",
                 writer_heap_bytes: int = 32_000_000):
        import tantivy

        self._tantivy = tantivy
        builder = tantivy.SchemaBuilder()
        # A fast field: hits map back to row ids by column lookup, no stored-document fetch.
        builder.add_integer_field("row_id", stored=False, indexed=True, fast=True)
        builder.add_text_field("text", stored=False, tokenizer_name=tokenizer)
        self._schema = builder.build()
        if path is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
            self._index = tantivy.Index(self._schema, path=str(path), reuse=True)
        else:
            self._index = tantivy.Index(self._schema)
        # One writer for the index's life (tantivy allows one per index); one indexing thread
        # because the machine's cores are shared with the query engine.
        self._writer = self._index.writer(heap_size=writer_heap_bytes, num_threads=1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._index.searcher().num_docs

    def add(self, row_ids: Sequence[int] | np.ndarray | pa.Array, texts: Sequence[str | None] | pa.Array) -> None:
        """Index texts under their row ids, replacing any text those ids had. Null texts
        only remove the row's previous text."""
        ids = _int64(row_ids)
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        texts = texts.to_pylist() if isinstance(texts, pa.Array) else list(texts)
        if len(ids) != len(texts):
            raise ModelError(f"{len(ids)} row ids but {len(texts)} texts")
        Document = self._tantivy.Document
        with self._lock:
            # Deletes apply only to documents added before them, so delete-then-add in one
            # commit is an upsert.
            self._delete(ids)
            for row_id, text in zip(ids.tolist(), texts):
                if text is not None:
                    self._writer.add_document(Document(row_id=row_id, text=text))
            self._commit()

    def delete(self, row_ids: Sequence[int] | np.ndarray | pa.Array) -> None:
        with self._lock:
            self._delete(_int64(row_ids))
            self._commit()

    def search(self, query: str, k: int = 10, *, candidates: Candidates = None,
               syntax: str = "plain") -> SearchResult:
        """Top-k rows by BM25 score.

        syntax: "plain" treats the query as words (any match ranks, more matches rank
        higher); "tantivy" passes tantivy's query language through (phrases, +must, -not,
        field:value), raising ModelError on a malformed query.
        candidates: only these row ids (a collection of ids; not a mask, since the text
        index has no row positions).
        """
        if k <= 0:
            return _empty_result()
        parsed = self._parse(query, syntax)
        if parsed is None:
            return _empty_result()
        tantivy = self._tantivy
        if candidates is not None:
            ids = _candidate_array(candidates)
            if ids.dtype == np.bool_:
                raise ModelError("a text index takes candidate row ids, not a mask")
            if len(ids) == 0:
                return _empty_result()
            # Score 0 for the id filter, so the BM25 scores are unchanged by it.
            restrict = tantivy.Query.const_score_query(
                tantivy.Query.term_set_query(self._schema, "row_id", np.unique(ids).tolist()), 0.0)
            parsed = tantivy.Query.boolean_query([(tantivy.Occur.Must, parsed), (tantivy.Occur.Must, restrict)])
        searcher = self._index.searcher()
        hits = searcher.search(parsed, k, count=False).hits
        if not hits:
            return _empty_result()
        ids = np.array(searcher.fast_field_values("row_id", [address for _, address in hits]), np.int64)
        scores = np.array([score for score, _ in hits], np.float32)
        order = np.lexsort((ids, -scores))  # tantivy does not order ties by id
        return SearchResult(ids[order], scores[order])

    def _parse(self, query: str, syntax: str):
        if syntax == "plain":
            # Lower case too: AND/OR/NOT/IN in capitals are operators in the query language.
            words = _QUERY_SYNTAX.sub(" ", query).lower().split()
            if not words:
                return None
            return self._index.parse_query(" ".join(words), ["text"])
        if syntax == "tantivy":
            try:
                return self._index.parse_query(query, ["text"])
            except ValueError as e:
                raise ModelError(f"invalid full-text query {query!r}: {e}") from None
        raise ModelError(f"syntax must be plain or tantivy, not {syntax!r}")

    def _delete(self, ids: np.ndarray) -> None:
        if len(ids):
            self._writer.delete_documents_by_query(
                self._tantivy.Query.term_set_query(self._schema, "row_id", np.unique(ids).tolist()))

    def _commit(self) -> None:
        self._writer.commit()
        self._index.reload()  # make the commit visible to the next searcher right away


# --------------------------------------------------------------------------- fusion

def reciprocal_rank_fusion(rankings: Sequence[SearchResult | Sequence[int] | np.ndarray], k: int = 60, *,
                           limit: int | None = None, weights: Sequence[float] | None = None) -> SearchResult:
    """Combine rankings by RRF: score(id) = sum over rankings of weight / (k + rank), rank from 1.

    Only ranks matter, so vector cosines and BM25 scores, which live on unrelated scales,
    can be fused without calibration. k=60 is the value from Cormack et al. (2009).
    """
    if weights is not None and len(weights) != len(rankings):
        raise ModelError(f"{len(weights)} weights for {len(rankings)} rankings")
    totals: dict[int, float] = {}
    for i, ranking in enumerate(rankings):
        ids = ranking.row_ids if isinstance(ranking, SearchResult) else _int64(ranking)
        w = 1.0 if weights is None else float(weights[i])
        seen: set[int] = set()
        for rank, row_id in enumerate(ids.tolist(), start=1):
            if row_id in seen:  # a ranking lists an id once; ignore repeats
                continue
            seen.add(row_id)
            totals[row_id] = totals.get(row_id, 0.0) + w / (k + rank)
    if not totals:
        return SearchResult(np.zeros(0, np.int64), np.zeros(0, np.float64))
    ids = np.fromiter(totals.keys(), np.int64, len(totals))
    scores = np.fromiter(totals.values(), np.float64, len(totals))
    order = np.lexsort((ids, -scores))
    if limit is not None:
        order = order[:limit]
    return SearchResult(ids[order], scores[order])
