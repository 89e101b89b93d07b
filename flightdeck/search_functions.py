"""Vector, full-text and hybrid search over accelerated columns, as SQL table functions.

    SELECT path, score, chunk FROM vector_search(guides, 'too many connections', 3)
    SELECT * FROM text_search('guides', 'pgbouncer pool', 5, content) WHERE path LIKE 'db/%'
    SELECT * FROM hybrid_search(guides, 'connection pool exhausted', 3)

A column configured with `embeddings` (and/or `full_text_search`) is indexed each time its
dataset's copy is refreshed: documents are chunked (Markdown on headings and paragraphs),
each chunk is embedded unless the same text was embedded before (a cache keyed by the
chunk's hash, kept on disk for file-mode copies), so a refresh that changes 10 rows embeds
10 rows. A search ranks chunks, keeps each row's best chunk, and returns the top rows with
the dataset's columns the caller's grant shows plus `score` and `chunk` (the search's own: a
dataset's column of either name is not returned). A WHERE clause on the dataset's columns is
handed to the search by DataFusion's filter pushdown and applied before ranking, so it never
leaves fewer than k rows when k rows match. Hybrid search fuses the vector and BM25 rankings
with reciprocal rank fusion.

Vector search is exact for columns under ``approximate_above`` chunks and goes through an
HNSW index above (``search_vectors``): its candidates are rescored exactly, a WHERE too
selective for it is searched exactly over the matching chunks, and query embeddings of
repeated texts come from a bounded LRU shared by every column.
"""
from __future__ import annotations

import datetime as dt

import logging
import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from datafusion import Table, udtf
from sqlglot.errors import TokenError
from sqlglot.tokens import TokenType

from federation.arrow_expr import referenced_fields
from federation.masks import ColumnMasks
from federation.scan import LazyDataset
from federation.tokens import postgres_tokens
from flightdeck.search_vectors import OVERFETCH, ColumnVectors, VectorSnapshot
from inference.ann import EXPANSION_SEARCH
from inference.chunking import chunk_document
from inference.embedder import TextEmbedder
from inference.query_cache import QueryVectorCache
from inference.search import SearchResult, TextIndex, reciprocal_rank_fusion

log = logging.getLogger("flightdeck.search")
MODES = ("vector", "text", "hybrid")
FUNCTION_NAMES = frozenset(f"{mode}_search" for mode in MODES)  # each call yields at most k rows
RESULT_FIELDS = [pa.field("score", pa.float64()), pa.field("chunk", pa.string())]
# The search's own fields take these names in its results: a dataset's column of the same name is
# not returned (a join on the dataset's key reads it), so `WHERE score > x` means one thing.
RESULT_NAMES = frozenset(field.name for field in RESULT_FIELDS)
FUSION_DEPTH = 50  # how many of each ranking hybrid search fuses
MAX_TEXT_OVERFETCH = 50  # a filter keeping under 1/50 of the chunks restricts the text search itself
MAX_TEXT_FETCH = 20_000  # the deepest unrestricted text ranking read before restricting it
QUERY_CACHE_SIZE = 4096  # query embeddings kept, over every model
MAX_K = 10_000  # rows one search returns at most: its rankings are made whole, k deep and more


class SearchError(ValueError):
    """A search cannot run as asked; the message says why."""


@dataclass(frozen=True)
class ColumnSearchSpec:
    dataset: str                     # qualified name
    column: str
    model: str | None = None         # embedding model; None: no vector search on this column
    chunking: bool = False
    target_chunk_size: int = 800
    overlap_size: int = 100
    full_text: bool = False
    approximate_above: int = 20_000  # chunks from which vector search uses the approximate index
    ef_search: int = EXPANSION_SEARCH  # candidates the approximate index considers per search


@dataclass(frozen=True)
class DatasetSearchSettings:
    schema: pa.Schema                # the dataset's columns (search results carry them)
    cache_dir: Path | None           # where embeddings are kept across restarts (None: memory only)
    ready_timeout: float = 30.0      # how long a search waits for the first index


@dataclass
class _Indexed:
    """One copy's search state, swapped whole when the copy is refreshed."""
    rows: pa.Table
    chunk_rows: np.ndarray           # row position of each chunk
    chunk_texts: pa.StringArray
    vectors: VectorSnapshot | None
    text: TextIndex | None


class ColumnIndex:
    def __init__(self, spec: ColumnSearchSpec, rows_schema: pa.Schema, embedder: Callable[[], TextEmbedder] | None,
                 cache_file: Path | None, ready_timeout: float = 30.0, query_cache: QueryVectorCache | None = None):
        self.spec = spec
        self.rows_schema = rows_schema
        self._embedder = embedder
        self.ready_timeout = ready_timeout
        self.query_cache = query_cache if query_cache is not None else QueryVectorCache()  # an empty one is falsy
        self.vectors = ColumnVectors(f"{spec.dataset}.{spec.column}", spec.model, embedder, cache_file,
                                     spec.approximate_above, spec.ef_search) if spec.model else None
        self._state: _Indexed | None = None
        self._indexed = threading.Event()

    @property
    def embedded_last(self) -> int:
        """Chunks embedded by the last rebuild (the rest came from the cache)."""
        return self.vectors.embedded_last if self.vectors else 0

    @property
    def embedded_total(self) -> int:
        return self.vectors.embedded_total if self.vectors else 0

    # ---- building -----------------------------------------------------------

    def rebuild(self, rows: pa.Table) -> None:
        """Index a new copy's rows; only chunks never embedded before go through the model. A copy
        whose searched column did not change keeps the indexes (a restart's refresh, a periodic
        full refresh of quiet data): only the rows they point into are new."""
        column = rows.column(self.spec.column)
        kept = self._state
        if kept is not None and kept.rows.column(self.spec.column).equals(column):
            if self.vectors is not None:
                self.vectors.unchanged()
            self._state = replace(kept, rows=_one_chunk(rows))
            return
        chunk_rows, chunk_texts, embed_texts = self._chunks(column)
        vectors = self.vectors.update(embed_texts) if self.vectors else None
        text = None
        if self.spec.full_text:
            text = TextIndex()
            text.add(np.arange(len(chunk_texts), dtype=np.int64), chunk_texts)
        self._state = _Indexed(_one_chunk(rows), chunk_rows, chunk_texts, vectors, text)
        self._indexed.set()

    def _chunks(self, column: pa.ChunkedArray) -> tuple[np.ndarray, pa.StringArray, list[str]]:
        """Per chunk: its row, its text (returned to the caller) and what is embedded."""
        values = column.to_pylist()
        if not self.spec.chunking:
            present = [i for i, v in enumerate(values) if v is not None]
            texts = [values[i] for i in present]
            return np.array(present, np.int64), pa.array(texts, pa.string()), texts
        rows, texts, embedded = [], [], []
        for position, value in enumerate(values):
            if value is None:
                continue
            for chunk in chunk_document(value, target_chunk_size=self.spec.target_chunk_size,
                                        overlap_size=self.spec.overlap_size):
                rows.append(position)
                texts.append(chunk.text)
                embedded.append(chunk.contextual_text())
        return np.array(rows, np.int64), pa.array(texts, pa.string()), embedded

    # ---- searching ----------------------------------------------------------

    def returned_fields(self, shown: Sequence[str] | None = None) -> list[pa.Field]:
        """The dataset's columns a search returns when a grant shows ``shown`` of them (None:
        all): never a hidden one, nor one named like the search's own fields."""
        return [f for f in self.rows_schema if f.name not in RESULT_NAMES and (shown is None or f.name in shown)]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(self.returned_fields() + RESULT_FIELDS)

    def _require(self) -> _Indexed:
        """The current index; the first one is waited for, as queries wait for a first copy."""
        if not self._indexed.wait(self.ready_timeout):
            raise SearchError(f"{self.spec.dataset}.{self.spec.column} is not indexed yet (its accelerated "
                              f"copy is still loading; waited {self.ready_timeout:g}s)")
        return self._state

    def search(self, mode: str, query: str, k: int, row_filter: pc.Expression | None,
               masks: ColumnMasks | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """The k best rows for ``query`` among those ``row_filter`` keeps: the dataset's ``columns``
        (None: every one ``returned_fields`` gives) as ``masks`` shows them, then ``score`` and
        ``chunk``. The filter sees only those columns, masked: a column a grant hides must not
        decide which rows come back, nor a WHERE on a masked one probe raw values."""
        if k > MAX_K:  # an index asked for a billion hits reserves their memory before it looks
            raise SearchError(f"{mode}_search: k is {k:,}; at most {MAX_K:,} rows per search")
        state = self._require()
        rows = state.rows.select(list(columns) if columns is not None else [f.name for f in self.returned_fields()])
        candidates = _matching_rows(rows, row_filter, masks)
        chunk_ids = None if candidates is None else np.flatnonzero(candidates[state.chunk_rows])
        if mode == "vector":
            ranked = self._vector_rows(state, query, k, chunk_ids)
        elif mode == "text":
            ranked = self._text_rows(state, query, k, chunk_ids)
        else:
            depth = max(k, FUSION_DEPTH)
            rankings = [self._vector_rows(state, query, depth, chunk_ids),
                        self._text_rows(state, query, depth, chunk_ids)]
            fused = reciprocal_rank_fusion([SearchResult(r[0], r[1]) for r in rankings], limit=k)
            best_chunk = {}
            for positions, _, chunks in reversed(rankings):  # the vector ranking's chunk wins
                best_chunk.update(zip(positions.tolist(), chunks.tolist()))
            ranked = (fused.row_ids, fused.scores, np.array([best_chunk[p] for p in fused.row_ids.tolist()], np.int64))
        positions, scores, chunks = ranked
        result = rows.take(pa.array(positions, pa.int64()))
        if masks is not None:  # before the search's own fields: a mask names a dataset's column
            result = masks.apply(result)
        result = result.append_column(RESULT_FIELDS[0], pa.array(np.asarray(scores, np.float64)))
        return result.append_column(RESULT_FIELDS[1], state.chunk_texts.take(pa.array(chunks, pa.int64())))

    def _vector_rows(self, state: _Indexed, query: str, k: int, chunk_ids: np.ndarray | None):
        if state.vectors is None:
            raise SearchError(f"{self.spec.dataset}.{self.spec.column} has no embeddings: "
                              "configure columns[].embeddings")
        vector = self.query_cache.vector(self.spec.model, query, lambda text: self._embedder().embed_numpy([text])[0])
        return _best_per_row(lambda depth: state.vectors.search(vector, depth, chunk_ids),
                             state.chunk_rows, k)

    def _text_rows(self, state: _Indexed, query: str, k: int, chunk_ids: np.ndarray | None):
        if state.text is None:
            raise SearchError(f"{self.spec.dataset}.{self.spec.column} has no full-text index: "
                              "set columns[].full_text_search.enabled")
        return _best_per_row(lambda depth: _text_ranking(state.text, query, depth, chunk_ids, len(state.chunk_rows)),
                             state.chunk_rows, k)


def _one_chunk(rows: pa.Table) -> pa.Table:
    """``rows`` with one chunk per column where it fits: a take over several chunks joins them
    all first, a copy of every row for each search (0.65 ms at 100k short rows)."""
    try:
        return rows.combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowCapacityError):  # a text column over 2 GiB stays chunked
        return rows


def _text_ranking(text: TextIndex, query: str, depth: int, chunk_ids: np.ndarray | None,
                  chunks: int) -> SearchResult:
    """The best ``depth`` chunks for ``query`` among ``chunk_ids`` (None: all of them).

    Restricting the index to thousands of ids makes it match each one; when the filter keeps
    a fair share of the chunks, the unrestricted ranking is read proportionally deeper and
    filtered instead (the restriction scores nothing, so the order is the same), deeper still
    when the filter keeps few of the best (it may disfavour the query's words), and the
    restricted search is the fallback when even that leaves fewer than ``depth``."""
    if chunk_ids is None or not len(chunk_ids) or len(chunk_ids) * MAX_TEXT_OVERFETCH < chunks:
        return text.search(query, depth, candidates=chunk_ids)
    kept = np.zeros(chunks, bool)
    kept[chunk_ids] = True
    fetch = math.ceil(depth * OVERFETCH * chunks / len(chunk_ids))
    while True:
        ranked = text.search(query, fetch)
        inside = kept[ranked.row_ids]
        if inside.sum() >= depth or len(ranked) < fetch:  # enough, or every match was ranked
            return SearchResult(ranked.row_ids[inside][:depth], ranked.scores[inside][:depth])
        if fetch >= MAX_TEXT_FETCH:
            return text.search(query, depth, candidates=chunk_ids)
        fetch = min(fetch * 8, MAX_TEXT_FETCH)


def _matching_rows(rows: pa.Table, row_filter: pc.Expression | None,
                   masks: ColumnMasks | None = None) -> np.ndarray | None:
    """A mask of the rows a pushed WHERE keeps (None: no filter on the dataset's columns), the
    WHERE seeing the rows as ``masks`` shows them."""
    referenced = referenced_fields(row_filter) if row_filter is not None else set()
    if row_filter is None or not referenced <= set(rows.column_names):
        return None  # a filter on score/chunk can only apply after ranking: DataFusion does that
    if referenced:  # only the columns it reads: carrying the others through the filter costs more
        rows = rows.select(sorted(referenced))
        if masks is not None:  # masks the filter's own columns, if it reads masked ones
            rows = masks.apply(rows)
    position = _unused_name("__position", rows.column_names)
    numbered = rows.append_column(position, pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    kept = ds.dataset(numbered).to_table(columns=[position], filter=row_filter).column(0)
    mask = np.zeros(rows.num_rows, bool)
    mask[kept.to_numpy()] = True
    return mask


def _unused_name(name: str, taken: list[str]) -> str:
    """``name``, lengthened until no column of the dataset has it: a dataset may name a column
    anything, even the name the filter's row numbers would take."""
    while name in taken:
        name += "_"
    return name


def _best_per_row(ranking: Callable[[int], SearchResult], chunk_rows: np.ndarray, k: int):
    """The top k rows by their best chunk: (row positions, scores, chunk ids), best first.
    Asks for deeper chunk rankings until k distinct rows are found or every chunk is ranked."""
    depth = min(k * 4, max(len(chunk_rows), 1))
    while True:
        result = ranking(depth)
        rows, first = np.unique(chunk_rows[result.row_ids], return_index=True)
        if len(rows) >= k or len(result) < depth or depth >= len(chunk_rows):
            break
        depth = min(depth * 4, len(chunk_rows))
    order = np.sort(first)[:k]  # first occurrence of each row, in ranking order
    return chunk_rows[result.row_ids[order]], result.scores[order], result.row_ids[order]


Visible = Callable[[str], Sequence[str] | None]  # a dataset's visible columns; None: a hidden dataset
MasksOf = Callable[[str], "ColumnMasks | None"]  # a dataset's column masks; None: none


class SearchIndexes:
    """Every searchable column of the stack, kept in step with the accelerated copies."""

    def __init__(self, specs: list[ColumnSearchSpec], embedder_for: Callable[[str], TextEmbedder],
                 settings_for: Callable[[str], "DatasetSearchSettings"]):
        self.columns: dict[tuple[str, str], ColumnIndex] = {}
        self.query_cache = QueryVectorCache(QUERY_CACHE_SIZE)
        self._embedder_for = embedder_for
        self._settings_for = settings_for
        self._lock = threading.Lock()
        self._as_of: dict[str, dt.datetime | None] = {}
        self.add(specs)

    def add(self, specs: list[ColumnSearchSpec]) -> None:
        """Indexes for these columns (of datasets not indexed, or removed), empty until their
        copy's next refresh."""
        added = {}
        for spec in specs:
            embedder = (lambda model=spec.model: self._embedder_for(model)) if spec.model else None
            settings = self._settings_for(spec.dataset)
            cache = settings.cache_dir / f"{spec.dataset}.{spec.column}.arrow" if settings.cache_dir else None
            added[(spec.dataset, spec.column)] = ColumnIndex(
                spec, settings.schema, embedder, cache, settings.ready_timeout, self.query_cache)
        for dataset, schema in {name: index.rows_schema for (name, _), index in added.items()}.items():
            _warn_of_shadowed_columns(dataset, schema)
        self.columns = {**self.columns, **added}  # a new dict: searches may be going through it

    def remove(self, dataset: str) -> None:
        """A dataset's indexes gone (it is not served, or not copied any more): searching it fails
        as for any dataset without them."""
        # A new dict, and no lock: searches may be going through it, and a refresh holding the
        # lock while it embeds must not hold up whoever takes the dataset out.
        self.columns = {key: index for key, index in self.columns.items() if key[0] != dataset}
        self._as_of.pop(dataset, None)

    def datasets(self) -> set[str]:
        return {dataset for dataset, _ in self.columns}

    def datasets_searched(self, sql: str, plan: Callable[[], str] | None = None,
                          searchable: Visible | None = None) -> list[str]:
        """The qualified names of the datasets whose indexes a statement's search table functions
        read, sorted: of the calls its text makes (``hybrid_search(guides, ...)``), those to a
        function its plan scans (``plan()``, the logical plan's text, is asked for only when
        there are calls) on a dataset ``searchable`` lets be searched. The text alone is not
        enough: a CTE may take a function's name, and name a hidden dataset as its column."""
        calls = _search_calls(sql)
        if calls and plan is not None:
            scanned = scanned_search_functions(plan())
            calls = {(function, dataset) for function, dataset in calls if function in scanned}
        allowed = {dataset for dataset, _ in self.searchable(searchable)}
        return sorted({dataset for _, dataset in calls} & allowed)

    def on_refreshed(self, dataset: str, as_of: dt.datetime | None, rows: pa.Table) -> None:
        """Index a dataset's new copy (``rows``, taken from its source at ``as_of``). A copy with
        other columns than its indexes have is left out: a refresh that began before its source's
        columns changed, ending after the indexes were made again for the new ones (the copy made
        again with them indexes them next), or one of a dataset whose indexes were removed."""
        with self._lock:
            indexes = [index for (name, _), index in self.columns.items() if name == dataset]
            if not indexes or not all(index.rows_schema.equals(rows.schema) for index in indexes):
                return
            for index in indexes:
                index.rebuild(rows)
            self._as_of[dataset] = as_of

    def data_as_of(self, dataset: str) -> dt.datetime | None:
        """When the copy a dataset's indexes were built from was taken (None: not indexed yet):
        a search reads the indexes, which follow the copy some seconds later, re-embedding."""
        return self._as_of.get(dataset)

    def embedded(self, dataset: str) -> tuple[int, int]:
        """(chunks embedded by the last refresh, in total) for a dataset's columns."""
        indexes = [i for (name, _), i in self.columns.items() if name == dataset]
        return sum(i.embedded_last for i in indexes), sum(i.embedded_total for i in indexes)

    def searchable(self, visible: Visible | None = None) -> dict[tuple[str, str], ColumnIndex]:
        """The indexes a grant may search: of the datasets and columns it sees (a hidden column is
        never searched: its chunks are its text)."""
        if visible is None:
            return self.columns
        return {(name, col): index for (name, col), index in self.columns.items()
                if col in (visible(name) or ())}

    def find(self, dataset: str, column: str | None, mode: str, visible: Visible | None = None) -> ColumnIndex:
        qualified = dataset if "." in dataset else f"public.{dataset}"
        searchable = self.searchable(visible)
        candidates = [index for (name, col), index in searchable.items()
                      if name == qualified and (column is None or col == column)]
        if mode != "text":
            candidates = [c for c in candidates if c.spec.model] or candidates
        if mode != "vector":
            candidates = [c for c in candidates if c.spec.full_text] or candidates
        if not candidates:
            known = ", ".join(f"{d}.{c}" for d, c in sorted(searchable)) or "none"
            raise SearchError(f"no searchable column {dataset}{'.' + column if column else ''} "
                              f"(searchable columns: {known})")
        if len(candidates) > 1:
            raise SearchError(f"{dataset} has several searchable columns: name one as the 4th argument")
        return candidates[0]

    def table_functions(self, visible: Visible | None = None, masks_of: MasksOf | None = None,
                        searchable: Visible | None = None) -> list:
        """The search table functions of one engine session, over what ``visible`` shows, with
        the columns ``masks_of`` names masked in results; only ``searchable`` columns (by
        default the visible ones) are searched."""
        return [udtf(_TableFunction(self, mode, visible, masks_of, searchable or visible), f"{mode}_search")
                for mode in MODES]


class _TableFunction:
    """``<mode>_search(dataset, query, k [, column])``: a lazy table DataFusion scans."""

    def __init__(self, indexes: SearchIndexes, mode: str, visible: Visible | None, masks_of: MasksOf | None,
                 searchable: Visible | None):
        self.indexes = indexes
        self.mode = mode
        self.visible = visible
        self.masks_of = masks_of or (lambda dataset: None)
        self.searchable = searchable

    def __call__(self, *args) -> Table:
        if len(args) not in (3, 4):
            raise SearchError(f"{self.mode}_search(dataset, query, k [, column]) takes 3 or 4 arguments, "
                              f"got {len(args)}")
        dataset, query, k = (_argument(a) for a in args[:3])
        column = _argument(args[3]) if len(args) == 4 else None
        index = self.indexes.find(str(dataset), None if column is None else str(column), self.mode, self.searchable)
        unbound = query is None or k is None  # a statement being prepared: parameters come later
        if not unbound and (not isinstance(query, str) or not isinstance(k, int) or k < 1):
            raise SearchError(f"{self.mode}_search: the query must be text and k a positive integer")
        shown = None if self.visible is None else self.visible(index.spec.dataset)
        return Table(SearchResults(index, self.mode, query, k, shown, self.masks_of(index.spec.dataset)))


def _search_calls(sql: str) -> set[tuple[str, str]]:
    """(function, qualified dataset) of each search call a statement's text makes."""
    try:
        tokens = postgres_tokens(sql)
    except TokenError:
        return set()
    found = set()
    for i, token in enumerate(tokens[:-2]):
        function = token.text.lower()
        if function in FUNCTION_NAMES and tokens[i + 1].token_type == TokenType.L_PAREN:
            name = _first_argument(tokens[i + 2:])
            if name:
                found.add((function, name if "." in name else f"public.{name}"))
    return found


def scanned_search_functions(plan_text: str) -> set[str]:
    """The search functions a logical plan scans, from its text (``display_indent``), where the
    plans of subqueries show too: ``TableScan: text_search() projection=[...]``."""
    scanned = set()
    for line in plan_text.splitlines():
        node, _, rest = line.strip().partition(":")
        words = rest.split(maxsplit=1)
        if node == "TableScan" and words and words[0].endswith("()") and words[0][:-2] in FUNCTION_NAMES:
            scanned.add(words[0][:-2])
    return scanned


def _warn_of_shadowed_columns(dataset: str, schema: pa.Schema) -> None:
    """Says when a searchable dataset has a column its search results do not return."""
    shadowed = sorted(RESULT_NAMES & set(schema.names))
    if shadowed:
        log.warning("%s has column(s) %s: its search results carry the search's own field of that name "
                    "instead (join %s on its key to read the column)", dataset, ", ".join(shadowed), dataset)


def _first_argument(tokens: list) -> str:
    """The text of a call's first argument (a string or a dotted name), from the tokens after ``(``."""
    parts = []
    for token in tokens:
        if token.token_type in (TokenType.COMMA, TokenType.R_PAREN):
            break
        parts.append(token.text)
    return "".join(parts)


def _argument(expression) -> object:
    """A table function argument: a literal's value, or a bare name (``guides``) as text."""
    variant = expression.to_variant()
    if type(variant).__name__ == "Column":
        return variant.name()
    value = expression.python_value()
    return value.as_py() if isinstance(value, pa.Scalar) else value


class SearchResults(LazyDataset):
    """One search, run when DataFusion scans it, with the WHERE it pushes applied first."""

    def __init__(self, index: ColumnIndex, mode: str, query: str | None, k: int | None,
                 shown: Sequence[str] | None = None, masks: ColumnMasks | None = None):
        # Only the columns the grant shows exist here, so no filter, result or error (planning and
        # Arrow errors list a schema's fields) can reach a hidden one.
        fields = pa.schema(index.returned_fields(shown))
        super().__init__(pa.schema(list(masks.schema(fields) if masks else fields) + RESULT_FIELDS))
        self.index, self.mode, self.query, self.k, self.masks = index, mode, query, k, masks
        self.columns = fields.names

    def batches(self, columns: list[str], filter: pc.Expression | None, pin: Any = None) -> Iterator[pa.RecordBatch]:
        if self.query is None or self.k is None:
            raise SearchError(f"{self.mode}_search: the query and k must be given (bind the parameters)")
        table = self.index.search(self.mode, self.query, self.k, filter, self.masks, self.columns)
        if filter is not None:
            table = table.filter(filter)
        yield from table.select(columns).to_batches()
