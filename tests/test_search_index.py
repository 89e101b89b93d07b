"""The approximate vector index and the query embedding cache: approximate results against
exact search, where-filters, small tables kept exact, an index grown by an append refresh
and reloaded from disk for a file-mode copy, repeated query texts embedded once."""
from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import serving
from flightdeck.search_functions import (ColumnIndex, ColumnSearchSpec, DatasetSearchSettings, SearchIndexes,
                                         _matching_rows, _text_ranking)
from flightdeck.search_vectors import VectorSnapshot
from inference.ann import ApproximateIndex
from inference.embedder import TextEmbedder
from inference.search import TextIndex
from inference.st_dir import bundled_minilm_dir
from test_search import _embedded, _notes_config, notes_table  # noqa: F401 (a fixture)

SERVICES = ["checkout-api", "orders-db", "pgbouncer", "payments", "catalog", "search", "auth", "cdn"]
SYMPTOMS = ["connection pool exhausted", "p99 latency above SLO", "disk 95% full on log volume",
            "TLS certificate expires in 3 days", "cache hit ratio dropped to 20%", "502 from the gateway",
            "sequential scan on orders", "too many clients already", "retry storm after deploy"]
QUESTIONS = ["database refuses new connections", "the gateway answers 502", "a certificate is about to expire",
             "log disk almost full", "slow queries scan the orders table", "retries overload after a release"]


def unit_vectors(rows: int, dim: int, seed: int) -> np.ndarray:
    """Clustered unit vectors, as embeddings are: topic centres plus spread plus noise."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 64, rows)] + 0.7 * rng.standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_approximate_search_finds_what_exact_search_finds():
    vectors, queries = unit_vectors(20_000, 64, 1), unit_vectors(100, 64, 2)
    index = ApproximateIndex(64)
    index.add(np.arange(len(vectors)), vectors)
    snapshot = VectorSnapshot.of(vectors, np.arange(len(vectors)), index)
    recalls = []
    for query in queries:
        exact = snapshot.exact.search(query, 10)
        found = snapshot.search(query, 10, None)
        recalls.append(len(set(found.row_ids.tolist()) & set(exact.row_ids.tolist())) / 10)
        # the scores are exact cosines: approximate only in which rows were considered
        np.testing.assert_allclose(found.scores, vectors[found.row_ids] @ query / np.linalg.norm(query), rtol=1e-5)
    assert np.mean(recalls) >= 0.95


def test_index_labels_continue_in_order():
    index = ApproximateIndex(4)
    index.add(np.arange(3), np.eye(4, dtype=np.float32)[:3])
    with pytest.raises(Exception, match="continue from 3"):
        index.add(np.array([7]), np.eye(4, dtype=np.float32)[:1])


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> TextEmbedder:
    cache = tmp_path_factory.getbasetemp() / "inference-model-cache"  # shared with the other model tests
    return TextEmbedder.from_sentence_transformers(bundled_minilm_dir(), cache, threads=2)


def notes(rows: int, start: int = 0) -> pa.Table:
    ids = np.arange(start, start + rows)
    return pa.table({"id": ids, "service": [SERVICES[i % len(SERVICES)] for i in ids],
                     "note": [f"{SERVICES[i % 8]}: {SYMPTOMS[(i // 8) % 9]} (ticket {i})" for i in ids]})


def column(embedder, approximate_above: int, cache_file=None) -> ColumnIndex:
    spec = ColumnSearchSpec("public.notes", "note", model="minilm", approximate_above=approximate_above)
    return ColumnIndex(spec, notes(0).schema, lambda: embedder, cache_file)


@pytest.fixture(scope="module")
def approximate_and_exact(embedder):
    rows = notes(3000)
    approximate, exact = column(embedder, 0), column(embedder, 10_000)
    approximate.rebuild(rows)
    exact.rebuild(rows)
    return approximate, exact


def test_small_tables_use_exact_search(approximate_and_exact):
    approximate, exact = approximate_and_exact
    assert exact.vectors.approximate is None and approximate.vectors.approximate is not None
    assert len(approximate.vectors.approximate) == 3000


@pytest.mark.parametrize("where", [
    None,
    pc.field("service") != "pgbouncer",                  # keeps most rows: over-fetch, then filter
    pc.field("service") == "payments",                   # an eighth of the rows
    pc.field("id").isin([5, 77, 1234, 2999, 1500, 42]),  # selective: exact over the matching rows
])
def test_where_filters_stay_correct_with_the_approximate_index(approximate_and_exact, where):
    approximate, exact = approximate_and_exact
    allowed = set(pa.table(notes(3000)).filter(where if where is not None else pc.scalar(True))
                  .column("id").to_pylist())
    for question in QUESTIONS:
        found = approximate.search("vector", question, 10, where)
        reference = exact.search("vector", question, 10, where)
        assert found.num_rows == reference.num_rows == min(10, len(allowed))
        assert set(found.column("id").to_pylist()) <= allowed
        overlap = set(found.column("id").to_pylist()) & set(reference.column("id").to_pylist())
        assert len(overlap) >= 0.9 * reference.num_rows, (question, where)


@pytest.mark.parametrize("share", [0.9, 0.5, 0.125, 0.03, 0.01, 0.002, 0.0])
def test_a_text_search_under_a_where_ranks_exactly_as_the_restricted_search(share):
    """Read deeper and filtered (a fair share kept) or restricted (few kept), a filtered text
    search finds the same best chunks as the index restricted to the matching ones."""
    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)), p=_zipf(len(words)))) for _ in range(4000)]
    index = TextIndex()
    index.add(np.arange(len(texts)), texts)
    kept = np.flatnonzero(rng.random(len(texts)) < share)
    for query in ["w1 w7", "w150 w3 w299", "w42", "w0 w1 w2 w3"]:
        for depth in (1, 10, 40):
            found = _text_ranking(index, query, depth, kept, len(texts))
            reference = index.search(query, depth, candidates=kept) if len(kept) else index.search(query, 0)
            assert set(found.row_ids.tolist()) <= set(kept.tolist())
            np.testing.assert_allclose(found.scores, reference.scores, rtol=1e-6)  # ties may swap equal rows
            assert len(found) == min(depth, len(reference)) if len(kept) else len(found) == 0


def test_a_text_search_under_a_where_against_its_words_still_finds_the_best_kept():
    """A filter keeping only rows without the query's commonest word: the best kept chunks
    lie deep in the unrestricted ranking, which is read deeper, or restricted at last."""
    rng = np.random.default_rng(9)
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)), p=_zipf(len(words)))) for _ in range(30000)]
    index = TextIndex()
    index.add(np.arange(len(texts)), texts)
    for banned, query in [("w0", "w0 w250"), ("w1", "w1 w2 w299"), ("w3", "w3")]:
        kept = np.array([i for i, text in enumerate(texts) if banned not in text.split()])
        for depth in (10, 40):
            found = _text_ranking(index, query, depth, kept, len(texts))
            reference = index.search(query, depth, candidates=kept)
            assert set(found.row_ids.tolist()) <= set(kept.tolist())
            np.testing.assert_allclose(found.scores, reference.scores, rtol=1e-6)


def test_a_text_search_under_a_where_over_an_empty_index_finds_nothing():
    found = _text_ranking(TextIndex(), "w1", 10, np.zeros(0, np.int64), 0)
    assert len(found) == 0


def _zipf(n: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1)
    return weights / weights.sum()


def test_repeated_query_texts_are_embedded_once(embedder):
    index = column(embedder, 0)
    index.rebuild(notes(200))
    cache = index.query_cache
    hits, misses = cache.hits, cache.misses
    first = index.search("vector", "pool exhausted on the pooler", 5, None)
    again = index.search("vector", "pool exhausted on the pooler", 5, None)
    assert (cache.hits - hits, cache.misses - misses) == (1, 1)
    assert first.equals(again)
    index.search("vector", "another question", 5, None)
    assert (cache.hits - hits, cache.misses - misses) == (1, 2)


def test_a_where_on_a_column_named_like_the_row_numbers_filters_it():
    rows = pa.table({"__position": [5, 6, 7], "__position_": ["x", "y", "z"]})
    assert _matching_rows(rows, pc.field("__position") > 5).tolist() == [False, True, True]
    assert _matching_rows(rows, pc.field("__position_") == "x").tolist() == [True, False, False]


def test_every_searchable_column_shares_the_one_query_cache(embedder):
    specs = [ColumnSearchSpec(dataset, "note", model="minilm") for dataset in ("public.notes", "public.tickets")]
    settings = DatasetSearchSettings(notes(0).schema, None)
    indexes = SearchIndexes(specs, lambda model: embedder, lambda dataset: settings)
    for index in indexes.columns.values():
        index.rebuild(notes(50))
    for dataset in ("public.notes", "public.tickets"):
        indexes.find(dataset, None, "vector").search("vector", "one question asked of both", 3, None)
    assert (indexes.query_cache.hits, indexes.query_cache.misses, len(indexes.query_cache)) == (1, 1, 1)


def test_a_copy_with_other_columns_than_the_indexes_is_not_indexed():
    """The indexes of a dataset whose source's columns changed are made again for the new ones;
    a refresh that began with the old columns and ended after that filled them with the old rows
    (a search then failed on a column they lacked), and one ending after the indexes were removed
    gave the dataset an indexed time back."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    old_rows = pa.table({"id": pa.array([1], pa.int32()), "note": ["checkout latency"]})
    new_rows = old_rows.append_column("added", pa.array(["x"]))
    spec = ColumnSearchSpec("public.notes", "note", full_text=True)
    indexes = SearchIndexes([spec], lambda model: None, lambda dataset: DatasetSearchSettings(new_rows.schema, None))
    indexes.on_refreshed("public.notes", now, old_rows)
    assert indexes.data_as_of("public.notes") is None
    indexes.on_refreshed("public.notes", now, new_rows)
    assert indexes.data_as_of("public.notes") == now
    found = indexes.find("notes", None, "text").search("text", "latency", 1, None)
    assert found.to_pylist()[0]["added"] == "x"
    indexes.remove("public.notes")
    indexes.on_refreshed("public.notes", now, new_rows)
    assert indexes.data_as_of("public.notes") is None


def test_query_cache_is_bounded_and_keyed_by_model():
    from inference.query_cache import QueryVectorCache

    cache, calls = QueryVectorCache(capacity=2), []

    def embed(text):
        calls.append(text)
        return np.array([len(text)], np.float32)
    for model, text in [("a", "x"), ("b", "x"), ("a", "x"), ("a", "yy"), ("b", "x")]:
        cache.vector(model, text, embed)
    # ("a","x") hit once; ("b","x") was pushed out by ("a","yy") and embedded again
    assert (cache.hits, cache.misses, len(cache)) == (1, 4, 2) and calls == ["x", "x", "yy", "x"]


def test_query_cache_keeps_no_text():
    """Keyed by the text itself, the cache held every long query a client sent (10 MB texts:
    4,096 of them, shared by every key); it now holds their digests."""
    import tracemalloc

    from inference.query_cache import QueryVectorCache

    cache = QueryVectorCache(capacity=64)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for number in range(20):
            text = str(number) * 1_000_000
            cache.vector("m", text, lambda t: np.zeros(384, np.float32))
            del text
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 20 and held < 200_000  # 20 vectors of 1.5 KB, not 20 MB of text
    assert cache.vector("m", "5" * 1_000_000, lambda t: None) is not None and cache.hits == 1


def test_refresh_grows_the_index_and_a_file_copy_reloads_it(embedder, tmp_path):
    cache_file = tmp_path / "public.notes.note.arrow"
    first = column(embedder, 100, cache_file)
    first.rebuild(notes(500))
    index = first.vectors.approximate
    first.rebuild(pa.concat_tables([notes(500), notes(40, start=500)]))  # what an append refresh serves
    assert first.vectors.approximate is index and len(index) == 540  # grown in place
    assert (first.vectors.index_added_last, first.vectors.index_builds) == (40, 1)
    first.rebuild(notes(500, start=10_000))  # a replace with new data: built beside, then swapped
    assert first.vectors.approximate is not index and len(first.vectors.approximate) == 500
    assert first.vectors.index_builds == 2
    expected = first.search("vector", QUESTIONS[0], 10, None)

    restarted = column(embedder, 100, cache_file)  # a restart of a file-mode copy
    assert restarted.vectors.index_loaded
    restarted.rebuild(notes(500, start=10_000))
    assert (restarted.vectors.index_builds, restarted.vectors.embedded_last) == (0, 0)
    assert restarted.search("vector", QUESTIONS[0], 10, None).equals(expected)

    cache_file.with_suffix(".hnsw.json").write_text("{}")  # an index that does not match the cache
    assert not column(embedder, 100, cache_file).vectors.index_loaded


def test_append_refresh_adds_to_the_index_through_the_stack(notes_table, tmp_path):  # noqa: F811
    config = _notes_config(tmp_path, {"engine": "duckdb", "mode": "file", "refresh_mode": "append",
                                      "primary_key": "id", "refresh_sql": "SELECT * FROM notes WHERE id <= 300"})
    config["datasets"][0]["columns"][0]["embeddings"][0]["vector_index"] = {"approximate_above": 100}
    with serving(config, tmp_path) as runtime:
        assert runtime.accelerator.refresher("public.notes").loaded.wait(120)
        vectors = runtime.stack.search.find("public.notes", None, "vector").vectors
        index = vectors.approximate
        assert len(index) == 300
        with notes_table.cursor() as cursor:
            cursor.execute("UPDATE fd_search.notes SET at = now(), note = 'brand new note ' || id WHERE id > 290")
        runtime.refresh("notes", "SELECT * FROM notes WHERE id <= 305")
        # 10 changed rows and 5 new ones: 15 new texts added to the live index, none rebuilt
        assert vectors.approximate is index and len(index) == 315 and vectors.index_added_last == 15
        top = runtime.engine.query("SELECT id FROM vector_search(notes, 'brand new note', 3) WHERE id > 295"
                                   ).read_all().column("id").to_pylist()
        assert len(top) == 3 and all(295 < i <= 305 for i in top)
    with serving(config, tmp_path) as runtime:  # a restart: the kept index serves
        vectors = runtime.stack.search.find("public.notes", None, "vector").vectors
        assert vectors.index_loaded and len(vectors.approximate) == 315


def test_a_searched_dataset_reports_the_time_of_the_copy_its_indexes_hold(notes_table, tmp_path, monkeypatch):  # noqa: F811
    """The copy's time was set before its indexes were rebuilt (seconds of embedding): a search
    answered from the previous copy's indexes claimed the new copy's freshness."""
    config = _notes_config(tmp_path, {"engine": "duckdb", "refresh_sql": "SELECT * FROM notes WHERE id <= 50"})
    with serving(config, tmp_path) as runtime:
        refresher = runtime.accelerator.refresher("public.notes")
        assert refresher.loaded.wait(120)
        first = runtime.service.freshness(["public.notes"]).datasets["public.notes"]
        assert first == refresher.status.data_as_of
        rebuilding, finish = threading.Event(), threading.Event()
        rebuild = ColumnIndex.rebuild

        def slow_rebuild(index, rows):
            rebuilding.set()
            finish.wait(30)
            rebuild(index, rows)
        monkeypatch.setattr(ColumnIndex, "rebuild", slow_rebuild)
        refreshing = threading.Thread(target=runtime.refresh, args=("notes",))
        refreshing.start()
        assert rebuilding.wait(60)  # the new copy is in, its indexes not yet
        assert refresher.status.data_as_of > first
        assert runtime.service.freshness(["public.notes"]).datasets["public.notes"] == first
        finish.set()
        refreshing.join(60)
        assert runtime.service.freshness(["public.notes"]).datasets["public.notes"] == refresher.status.data_as_of
