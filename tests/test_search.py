"""Vector, full-text and hybrid search over accelerated columns, through Flight SQL."""
from __future__ import annotations

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_postgresql.dbapi as adbc_postgres
import httpx
import pytest

from conftest import run_clients, serving
from flightdeck.auth import Principal

INCIDENT = "orders failing after scaling to three replicas: too many database connections"
POOLER = "connection-pooler-transaction-mode.md"
PG_URI = "postgresql://postgres@127.0.0.1:5432/test"
PG = {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"}
OPEN = Principal("anonymous")


def _rows(connection, sql: str, params=None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@pytest.mark.parametrize("mode", ["vector", "text", "hybrid"])
def test_the_incident_finds_the_connection_pooler_guide_first(connection, mode):
    rows = _rows(connection, f"SELECT path, score, chunk FROM {mode}_search(guides, ?, 3)", (INCIDENT,))
    assert rows[0][0] == POOLER, rows
    assert len(rows) == 3 and rows[0][1] > rows[1][1]
    assert len({r[0] for r in rows}) == 3  # one row per guide, its best chunk
    assert rows[0][2] and rows[0][2] in _rows(connection, "SELECT content FROM guides WHERE path = ?",
                                              (POOLER,))[0][0]


def test_text_search_with_keywords(connection):
    rows = _rows(connection, "SELECT path FROM text_search('guides', 'pgbouncer pool_mode', 2, content)")
    assert rows[0][0] == POOLER


def test_where_filters_before_ranking(connection):
    rows = _rows(connection, "SELECT path FROM vector_search(guides, ?, 3) WHERE path <> ?", (INCIDENT, POOLER))
    assert len(rows) == 3 and POOLER not in [r[0] for r in rows]  # still k rows: filtered, then ranked
    only = _rows(connection, "SELECT path FROM hybrid_search(guides, ?, 5) WHERE path LIKE 'cache%'", (INCIDENT,))
    assert [r[0] for r in only] == ["cache-stampede.md"]


def test_search_composes_with_sql(connection):
    rows = _rows(connection, "SELECT s.path, length(g.content) > 0 FROM vector_search(guides, ?, 2) s "
                             "JOIN guides g ON g.path = s.path ORDER BY s.score DESC", (INCIDENT,))
    assert rows[0] == (POOLER, True)


TEXTS = [INCIDENT, "cache stampede after a deploy", "it's a 'quoted' text", "back\\slash' OR 1=1 --",
         "$1 ? %s", "disk full on the primary", "ünïcode replica lag", "", "pool_mode transaction"]


def _literal_search(deck, mode: str, text: str) -> list[tuple]:
    """The same search with its text written into the statement: planned afresh each time."""
    literal = "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    table = deck.service.query(OPEN, f"SELECT path, score FROM {mode}_search(guides, {literal}, 3)").read_all()
    return list(zip(table.column("path").to_pylist(), table.column("score").to_pylist()))


@pytest.mark.parametrize("mode", ["vector", "text", "hybrid"])
def test_a_search_with_a_bound_text_is_planned_once_and_each_binding_answers_its_own(deck, mode):
    sql = f"SELECT path, score FROM {mode}_search(guides, ?, 3)"
    expected = {text: _literal_search(deck, mode, text) for text in TEXTS}
    before = deck.engine.plans.snapshot()
    with flightsql.connect(deck.flight_url, autocommit=True) as connection, connection.cursor() as cursor:
        for text in TEXTS * 3:
            cursor.execute(sql, (text,))
            assert [(path, pytest.approx(score)) for path, score in cursor.fetchall()] == expected[text], text
    after = deck.engine.plans.snapshot()
    assert after["statements_planned"] - before["statements_planned"] == 1  # at CreatePreparedStatement
    assert after["bindings_planned"] - before["bindings_planned"] == 1      # the first text binding
    failures: list[str] = []

    def client(number: int) -> None:
        with flightsql.connect(deck.flight_url, autocommit=True) as own, own.cursor() as cursor:
            for step in range(20):
                text = TEXTS[(number * 5 + step) % len(TEXTS)]
                cursor.execute(sql, (text,))
                rows = cursor.fetchall()
                if [(path, pytest.approx(score)) for path, score in rows] != expected[text]:
                    failures.append(f"{text!r}: {rows}")

    run_clients(client, 4)
    assert failures == []


def test_search_errors_are_precise_and_the_server_goes_on(connection):
    for sql, message in [
        ("SELECT * FROM vector_search(nope, 'x', 3)", "no searchable column nope"),
        ("SELECT * FROM vector_search(guides, 'x')", "takes 3 or 4 arguments"),
        ("SELECT * FROM text_search(guides, 'x', 0)", "k a positive integer"),
        # an index asked for a billion hits reserved 64 GB and aborted the server
        ("SELECT * FROM text_search(guides, 'pgbouncer', 1000000000)", "at most 10,000 rows per search"),
        ("SELECT * FROM hybrid_search(guides, 'pgbouncer', 1000000000000000000)", "at most 10,000 rows per search"),
        ("SELECT * FROM vector_search(guides, 'x', 3, title)", "no searchable column guides.title"),
    ]:
        with pytest.raises(Exception) as raised:
            _rows(connection, sql)
        assert message in str(raised.value) and "Traceback" not in str(raised.value)
        assert "UNAVAILABLE" not in str(raised.value)
    assert _rows(connection, "SELECT count(*) FROM guides")[0][0] == 6


def test_a_search_without_its_query_is_the_clients_error(server):
    """A request that can never work is no backend being unavailable (503 asks to retry)."""
    response = httpx.post(f"{server.http_url}/v1/sql", timeout=60, json={
        "sql": "SELECT path FROM text_search(guides, $1, 3)", "parameters": [None]})
    assert response.status_code == 400 and "the query and k must be given" in response.text


def test_embedding_status_is_reported(connection):
    rows = _rows(connection, "SELECT embedded_total FROM flightdeck.runtime.datasets WHERE name = 'public.guides'")
    assert rows[0][0] > 6  # chunked on headings and paragraphs: several chunks per guide


@pytest.fixture
def notes_table():
    try:
        admin = adbc_postgres.connect(PG_URI, autocommit=True)
    except Exception as error:
        pytest.fail(f"PostgreSQL is not reachable: {error}")
    with admin.cursor() as cursor:
        cursor.execute("DROP SCHEMA IF EXISTS fd_search CASCADE")
        cursor.execute("CREATE SCHEMA fd_search")
        cursor.execute("CREATE TABLE fd_search.notes (id bigint PRIMARY KEY, at timestamptz, note text)")
        cursor.execute("INSERT INTO fd_search.notes SELECT g, now() - interval '1 hour', "
                       "'order ' || g || ' ' || (ARRAY['failed: pool exhausted', 'shipped to customer', "
                       "'refunded after timeout', 'waiting for payment'])[g % 4 + 1] FROM generate_series(1, 10000) g")
    yield admin
    with admin.cursor() as cursor:
        cursor.execute("DROP SCHEMA IF EXISTS fd_search CASCADE")
    admin.close()


def _notes_config(tmp_path, acceleration: dict) -> dict:
    return {"runtime": {"data_dir": str(tmp_path / "data")},
            "datasets": [{"from": "postgres:fd_search.notes", "name": "notes", "params": PG, "time_column": "at",
                          "acceleration": acceleration,
                          "columns": [{"name": "note", "embeddings": [{"from": "minilm"}]}]}]}


def _embedded(runtime) -> tuple[int, int]:
    row = runtime.engine.query("SELECT embedded_last_refresh, embedded_total FROM flightdeck.runtime.datasets "
                               "WHERE name = 'public.notes'").read_all().to_pylist()[0]
    return row["embedded_last_refresh"], row["embedded_total"]


def test_a_refresh_embeds_only_the_rows_that_changed(notes_table, tmp_path):
    with serving(_notes_config(tmp_path, {"engine": "duckdb"}), tmp_path) as runtime:
        assert runtime.accelerator.refresher("public.notes").loaded.wait(300)
        assert _embedded(runtime) == (10_000, 10_000)  # every row once
        with notes_table.cursor() as cursor:
            cursor.execute("UPDATE fd_search.notes SET note = 'order ' || id || ' stuck: database connection "
                           "limit reached' WHERE id <= 10")
        runtime.refresh("notes")
        assert _embedded(runtime) == (10, 10_010)  # the ten changed rows, nothing else
        top = runtime.engine.query("SELECT id FROM vector_search(notes, 'too many database connections', 10)")
        assert sorted(r["id"] for r in top.read_all().to_pylist()) == list(range(1, 11))


def test_a_refresh_that_leaves_the_texts_alone_keeps_the_indexes_and_shows_the_new_rows(notes_table, tmp_path):
    config = _notes_config(tmp_path, {"engine": "duckdb"})
    config["datasets"][0]["columns"][0]["full_text_search"] = {"enabled": True}
    with serving(config, tmp_path) as runtime:
        assert runtime.accelerator.refresher("public.notes").loaded.wait(300)
        index = runtime.stack.search.find("public.notes", None, "vector")
        before = index._require()
        runtime.refresh("notes")  # the same rows in the same order, as after a restart
        after = index._require()
        assert _embedded(runtime) == (0, 10_000)
        assert after.vectors is before.vectors and after.text is before.text  # not rebuilt
        assert after.rows is not before.rows
        with notes_table.cursor() as cursor:  # other columns change (and PostgreSQL moves the rows)
            cursor.execute("UPDATE fd_search.notes SET at = '2001-02-03 04:05:06+00' WHERE id <= 10")
        runtime.refresh("notes")
        sql = "SELECT id, at FROM {}_search(notes, 'order waiting for payment', 3) WHERE id <= 10"
        for mode in ("vector", "text"):
            found = runtime.engine.query(sql.format(mode)).read_all().to_pylist()
            assert len(found) == 3 and all(r["at"].year == 2001 for r in found), found
        with notes_table.cursor() as cursor:
            cursor.execute("UPDATE fd_search.notes SET note = 'order 7 lost in the warehouse' WHERE id = 7")
        runtime.refresh("notes")
        assert _embedded(runtime) == (1, 10_001)  # a changed text is embedded, its indexes rebuilt
        assert index._require().text is not before.text
        found = runtime.engine.query("SELECT id FROM text_search(notes, 'warehouse', 3)").read_all()
        assert found.column("id").to_pylist() == [7]


def test_append_refresh_embeds_new_rows_and_file_copies_keep_their_embeddings(notes_table, tmp_path):
    config = _notes_config(tmp_path, {"engine": "duckdb", "mode": "file", "refresh_mode": "append",
                                      "primary_key": "id", "refresh_sql": "SELECT * FROM notes WHERE id <= 300"})
    with serving(config, tmp_path) as runtime:
        assert runtime.accelerator.refresher("public.notes").loaded.wait(120)
        assert _embedded(runtime) == (300, 300)
        with notes_table.cursor() as cursor:
            cursor.execute("UPDATE fd_search.notes SET at = now(), note = 'brand new note ' || id WHERE id > 290")
        runtime.refresh("notes", "SELECT * FROM notes WHERE id <= 305")
        assert _embedded(runtime) == (15, 315)  # 10 changed in the overlap-free append, 5 new
    with serving(config, tmp_path) as runtime:  # a restart: the kept copy and its embeddings serve
        refresher = runtime.accelerator.refresher("public.notes")
        assert refresher.loaded.is_set()
        runtime.refresh("notes")
        assert _embedded(runtime)[1] == 0  # nothing embedded again after the restart


@pytest.mark.parametrize("dataset, message", [
    ({"acceleration": {}, "columns": [{"name": "content", "embeddings": [{"from": "minilmm"}]}]},
     "datasets[0].columns[0].embeddings[0].from: unknown embedding model 'minilmm' (known: minilm)"),
    ({"columns": [{"name": "content", "full_text_search": {}}]},
     "built when the accelerated copy refreshes: enable acceleration"),
    ({"acceleration": {}, "columns": [{"name": "content", "embeddings": [{"from": "minilm", "chunking":
                                                                           {"target_chunk_size": 5}}]}]},
     "target_chunk_size"),
])
def test_search_config_errors_name_the_key(tmp_path, dataset, message):
    from flightdeck.config import ConfigError, parse_config
    with pytest.raises(ConfigError) as raised:
        parse_config({"datasets": [{"from": "file:guides/", "name": "guides", **dataset}]}, tmp_path, {})
    assert message in str(raised.value)


BOUNDED = ["SELECT 1", "SELECT ? * 2 AS doubled", "SELECT * FROM (VALUES (1), (2)) AS t(a)",
           "SELECT path, score FROM vector_search(guides, 'pool', 3) WHERE score > 0 ORDER BY score LIMIT 2",
           "SELECT count(*), max(score) FROM hybrid_search(guides, 'pool', 5)",
           "SELECT path FROM text_search(guides, 'pool', 3) UNION SELECT path FROM vector_search(guides, 'x', 3)",
           "SELECT CAST(score AS VARCHAR), -score * 2.5 FROM vector_search(guides, 'x', 5) WHERE path LIKE 'c%'"]
UNBOUNDED = ["SELECT * FROM guides", "SELECT count(*) FROM range(1000000000)",
             "SELECT * FROM generate_series(1, 10)", "SELECT unnest([1, 2, 3])",
             "SELECT (SELECT count(*) FROM guides) AS n",
             "SELECT path FROM vector_search(guides, 'x', 3) WHERE path IN (SELECT path FROM guides)",
             "SELECT s.path FROM vector_search(guides, 'x', 3) s JOIN guides g ON g.path = s.path",
             "SELECT a.path FROM vector_search(guides, 'x', 9) a, text_search(guides, 'y', 9) b",
             "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r LIMIT 5",
             "SELECT cardinality(range(500000000))", "SELECT length(repeat('x', 1000000000))",
             "SELECT length(repeat(path, 1000000)) FROM vector_search(guides, 'x', 3)",
             "SELECT path FROM vector_search(guides, 'x', 3) WHERE length(repeat(path, 99999999)) > 1",
             "SELECT path, rank() OVER (ORDER BY score DESC) FROM vector_search(guides, 'x', 5)",
             "SELECT 'repeat(x' AS \"range(\""]  # a call's name in a text only: unbounded all the same


@pytest.mark.parametrize("sql", BOUNDED + UNBOUNDED)
def test_only_plans_of_bounded_work_are_read_without_the_event_loop(deck, sql):
    """Constants and searches (at most k rows each, through nodes that never multiply rows) are
    read on the calling thread; anything that may scan, join or recurse without end keeps the
    event loop, where a cancellation interrupts it."""
    from federation.engine import bounded_plan

    engine = deck.engine
    plan = engine.ctx.sql(sql.replace("?", "$1")).logical_plan()
    assert bounded_plan(plan, engine.bounded_table_functions) is (sql in BOUNDED), plan.display_indent()


def test_a_bounded_stream_stops_between_batches_when_cancelled():
    from datafusion import SessionConfig, SessionContext

    from federation.cancel import Cancellation, Stopped, cancellation_scope, stoppable_stream

    ctx = SessionContext(SessionConfig().with_batch_size(10))
    frame = ctx.sql("SELECT * FROM generate_series(1, 1000) AS t(n)")
    cancellation = Cancellation()
    with cancellation_scope(cancellation):
        reader = stoppable_stream(frame, frame.schema(), bounded=True)
    assert reader.read_next_batch().num_rows == 10
    cancellation.cancel()
    with pytest.raises(Stopped):
        reader.read_next_batch()
    cancelled_first = Cancellation()
    with cancellation_scope(cancelled_first):
        unread = stoppable_stream(frame, frame.schema(), bounded=True)
    cancelled_first.cancel()
    with pytest.raises(Stopped):  # before any batch is made
        unread.read_next_batch()
    whole = stoppable_stream(frame, frame.schema(), bounded=True).read_all()
    assert whole.column(0).to_pylist() == list(range(1, 1001))


def test_a_server_runs_blas_on_the_calling_thread(tmp_path):
    """OpenBLAS's idle workers spin after each call and take a core from the next embedding."""
    import threadpoolctl
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):  # as a process starts on two cores
        with serving({"datasets": []}, tmp_path):
            blas = [library for library in threadpoolctl.threadpool_info() if library["user_api"] == "blas"]
            assert blas and all(library["num_threads"] == 1 for library in blas), blas


NARROW, WIDE, ONE = "narrow-key-0123456789", "wide-key-0123456789", "one-key-0123456789"
NOTES = 40


@pytest.fixture(scope="module")
def shadowing(tmp_path_factory):
    """Searchable notes whose datasets have columns named like the search's own fields, each
    hidden from the narrow key: a float64 ``score`` (and a ``private``), an int64 ``score``, a
    large_string ``chunk``. The ``one`` key is granted notes2 alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("shadowing")
    numbers = range(1, NOTES + 1)
    common = {"id": pa.array(numbers, pa.int64()),
              "body": [f"note {i} about database connection pools" if i % 2 else f"note {i} about invoices"
                       for i in numbers]}
    own = {"notes": {"score": pa.array([i * 1.5 for i in numbers], pa.float64()),
                     "private": [f"PRIV-{i}" for i in numbers]},
           "notes2": {"score": pa.array([(i * 37) % 100 for i in numbers], pa.int64())},
           "notes3": {"chunk": pa.array([f"SECRET-{i:03d}" for i in numbers], pa.large_string())}}
    for name, columns in own.items():
        pq.write_table(pa.table({**common, **columns}), base / f"{name}.parquet")
    config = {
        "datasets": [{"from": f"file:{name}.parquet", "name": name, "acceleration": {"engine": "arrow"},
                      "columns": [{"name": "body", "full_text_search": {"enabled": True}}]} for name in own],
        "runtime": {"auth": {"api_keys": [WIDE, {"name": "narrow", "key": NARROW, "datasets": list(own),
                                                  "columns": {name: ["id", "body"] for name in own}},
                                              {"name": "one", "key": ONE, "datasets": ["notes2"]}]}}}
    with serving(config, base) as running:
        for name in own:
            assert running.accelerator.refresher(name).loaded.wait(60)
        yield running


def _as_key(deck, key: str, sql: str):
    """The result of ``sql`` under ``key`` (an Arrow table), or the text of its error."""
    with flightsql.connect(deck.flight_url, autocommit=True,
                           db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {key}"}) as own:
        with own.cursor() as cursor:
            try:
                cursor.execute(sql)
                return cursor.fetch_arrow_table()
            except Exception as error:
                return f"error: {error}"


@pytest.mark.parametrize("dataset", ["notes", "notes2", "notes3"])
def test_a_search_returns_the_visible_columns_and_its_own_fields_never_a_hidden_one(shadowing, dataset):
    """A hidden column named like the search's score or chunk neither breaks the search, nor
    decides which rows a WHERE keeps, nor shows (name, type or values) in a result or an error."""
    sql = f"SELECT * FROM text_search({dataset}, 'database', 5)"
    narrow, wide = _as_key(shadowing, NARROW, sql), _as_key(shadowing, WIDE, sql)
    assert not isinstance(narrow, str), narrow
    assert narrow.schema.names == ["id", "body", "score", "chunk"]
    assert narrow.schema.field("score").type == "double" and narrow.schema.field("chunk").type == "string"
    assert narrow.select(["id", "score", "chunk"]) == wide.select(["id", "score", "chunk"])  # what the wide key sees
    assert narrow.num_rows == 5 and all(text.startswith("note ") for text in narrow.column("chunk").to_pylist())
    hidden_scores = {i: i * 1.5 for i in range(1, NOTES + 1)} if dataset == "notes" else {}
    assert all(hidden_scores.get(i) != s for i, s in zip(narrow.column("id").to_pylist(),
                                                         narrow.column("score").to_pylist()))
    for where in ("score > 90", "score > 0 AND id > 0", "chunk LIKE 'SECRET%'"):  # on the search's fields
        filtered = _as_key(shadowing, NARROW, f"SELECT id, score FROM text_search({dataset}, 'database', 5) "
                                              f"WHERE {where}")
        assert not isinstance(filtered, str), filtered
        assert filtered == _as_key(shadowing, WIDE, f"SELECT id, score FROM text_search({dataset}, 'database', 5) "
                                                    f"WHERE {where}")
    assert _as_key(shadowing, NARROW, f"SELECT id FROM text_search({dataset}, 'database', 5) "
                                      "WHERE score > 90").num_rows == 0  # BM25 scores, not the hidden ones
    message = _as_key(shadowing, NARROW, f"SELECT nope FROM text_search({dataset}, 'database', 5)")
    assert message.startswith("error:") and "nope" in message
    assert not any(word in message for word in ("private", "int64", "large", "SECRET", "Multiple matches"))


def test_a_dataset_column_named_like_a_search_field_gives_way_to_it(shadowing):
    """The search's own score and chunk take their names in its results, for every key; the
    dataset's column of that name is read by joining the dataset."""
    found = _as_key(shadowing, WIDE, "SELECT * FROM text_search(notes, 'database', 3)")
    assert not isinstance(found, str), found
    assert found.schema.names == ["id", "body", "private", "score", "chunk"]
    joined = _as_key(shadowing, WIDE, "SELECT s.id, n.score AS own, s.score FROM text_search(notes, 'database', 3) s "
                                      "JOIN notes n ON n.id = s.id ORDER BY s.score DESC")
    assert [row["own"] for row in joined.to_pylist()] == [row["id"] * 1.5 for row in joined.to_pylist()]
    assert joined.column("score").to_pylist() == found.column("score").to_pylist()
    chunks = _as_key(shadowing, WIDE, "SELECT chunk FROM text_search(notes3, 'database', 3)")
    assert not isinstance(chunks, str) and not any("SECRET" in c for c in chunks.column("chunk").to_pylist())


def test_a_result_tells_the_freshness_of_granted_searches_only(shadowing):
    """A search the plan makes beside a CTE named after a hidden searchable dataset: the result
    tells how fresh the granted copy it searched is, and names no other."""
    import httpx

    sql = "WITH text_search(notes) AS (SELECT 1) SELECT s.id FROM text_search, text_search(notes2, 'database', 1) s"
    reply = httpx.post(f"{shadowing.http_url}/v1/sql", content=sql, headers={"Authorization": f"Bearer {ONE}"},
                       timeout=60)
    assert reply.status_code == 200, reply.text
    assert [entry.split("=")[0] for entry in reply.headers["x-flightdeck-data-as-of-datasets"].split(", ")] == \
        ["public.notes2"]
