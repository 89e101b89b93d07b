"""Models as SQL functions, end to end: a flightdeck process with `embeddings:` and `models:`
configured, queried through the ADBC Flight SQL driver. embed() is checked against the
sentence-transformers reference embeddings, predict() against scikit-learn itself."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ServerProcess, serving, write_config
from flightdeck.config import ConfigError, parse_config
from inference.reference import load_reference

REFERENCE = load_reference()
INCIDENT = "orders failing after scaling to three replicas: too many database connections"
POOLER_GUIDE = "connection-pooler-transaction-mode.md"


def shared_model_cache(tmp_path_factory) -> Path:
    """The conversion cache tests/test_inference_models.py fills (same pytest session)."""
    cache = tmp_path_factory.getbasetemp() / "inference-model-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def data_dir_with_cache(tmp_path_factory, name: str) -> Path:
    """A runtime.data_dir whose `models` folder is the shared cache, so MiniLM converts once."""
    data_dir = tmp_path_factory.mktemp(name)
    (data_dir / "models").symlink_to(shared_model_cache(tmp_path_factory), target_is_directory=True)
    return data_dir


def as_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    return arr.values.slice(arr.offset * dim, len(arr) * dim).to_numpy().reshape(len(arr), dim)


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def sklearn_models(tmp_path_factory) -> dict:
    from sklearn.datasets import make_classification, make_regression
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import Ridge
    from skl2onnx import to_onnx

    folder = tmp_path_factory.mktemp("sql-models")
    X, y = make_classification(n_samples=600, n_features=4, n_informative=3, n_redundant=0, random_state=1)
    X = X.astype(np.float32)
    clf = RandomForestClassifier(n_estimators=20, max_depth=6, random_state=1).fit(X, y)
    Xr, yr = make_regression(n_samples=600, n_features=3, noise=0.5, random_state=1)
    reg = Ridge(alpha=0.3).fit(Xr.astype(np.float32), yr)
    (folder / "churn.onnx").write_bytes(
        to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}}).SerializeToString())
    (folder / "spend.onnx").write_bytes(to_onnx(reg, Xr[:1].astype(np.float32)).SerializeToString())
    # The features as a dataset: float64 and integer columns (the models take float32).
    ids = np.arange(len(X))
    pq.write_table(pa.table({"id": ids, "f0": X[:, 0].astype(np.float64), "f1": X[:, 1].astype(np.float64),
                             "f2": X[:, 2].astype(np.float64), "f3": X[:, 3].astype(np.float64),
                             "r0": Xr[:, 0], "r1": Xr[:, 1], "r2": Xr[:, 2],
                             "n": (ids % 7).astype(np.int64), "label": y.astype(str)}),
                   folder / "features.parquet", row_group_size=256)
    return {"folder": folder, "X": X, "clf": clf, "Xr": Xr, "reg": reg}


@pytest.fixture(scope="module")
def inference_config(demo_config, sklearn_models, tmp_path_factory) -> Path:
    """The demo plus two embedding models, two tabular models and their feature table."""
    config = yaml.safe_load(demo_config.read_text())
    folder = sklearn_models["folder"]
    config["datasets"].append({"from": f"file:{folder / 'features.parquet'}", "name": "features"})
    config["embeddings"] = [
        {"name": "minilm", "from": "huggingface:sentence-transformers/all-MiniLM-L6-v2",
         "params": {"threads": 2}},
        {"name": "minilm_int8", "from": "minilm", "params": {"quantization": "int8", "threads": 2}},
    ]
    config["models"] = [{"name": "churn", "from": f"file:{folder / 'churn.onnx'}", "params": {"threads": 1}},
                        {"name": "spend", "from": f"file:{folder / 'spend.onnx'}"}]
    config["runtime"] = {"data_dir": str(data_dir_with_cache(tmp_path_factory, "sql-data"))}
    # Beside the demo's own config: its data/ paths are relative to this folder.
    return write_config(demo_config.parent / "inference.yaml", config)


@pytest.fixture(scope="module")
def model_server(inference_config) -> Iterator[ServerProcess]:
    process = ServerProcess(["run", "-c", str(inference_config), "--flight-port", "0"])
    yield process
    code, err = process.stop()
    assert code == 0, err
    assert "Traceback" not in err  # bad calls below are answered, never crash a handler


@pytest.fixture(scope="module")
def conn(model_server) -> Iterator[flightsql.Connection]:
    with flightsql.connect(model_server.url, autocommit=True) as connection:
        yield connection


def query(conn, sql: str, params=None) -> pa.Table:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetch_arrow_table()


# --------------------------------------------------------------------------- (a) reference

@pytest.fixture(scope="module")
def fp32_one_by_one(conn) -> np.ndarray:
    """Each reference text bound as a parameter: SELECT embed(?)."""
    rows = [as_matrix(query(conn, "SELECT embed(?) AS v", [text]).column("v"))[0] for text in REFERENCE.texts]
    return REFERENCE.cosines(np.stack(rows))


@pytest.fixture(scope="module")
def int8_batch(conn) -> np.ndarray:
    """All reference texts in one VALUES list, embedded by the int8 model in one call."""
    values = ", ".join(f"({i}, {sql_string(t)})" for i, t in enumerate(REFERENCE.texts))
    table = query(conn, f"SELECT column1 AS i, embed(column2, 'minilm_int8') AS v FROM (VALUES {values}) "
                        "ORDER BY column1")
    assert table.column("i").to_pylist() == list(range(len(REFERENCE.texts)))
    return REFERENCE.cosines(as_matrix(table.column("v")))


@pytest.mark.parametrize("case", range(len(REFERENCE.texts)), ids=[f"{i}:{t[:20]!r}" for i, t in
                                                                   enumerate(REFERENCE.texts)])
def test_embed_over_flight_matches_the_reference(fp32_one_by_one, int8_batch, case):
    assert fp32_one_by_one[case] >= 0.999
    assert int8_batch[case] >= 0.99


# --------------------------------------------------------------------------- (b) (c) tables

def test_embed_a_table_column(conn):
    table = query(conn, "SELECT path, embed(content) FROM guides ORDER BY path")
    assert table.schema.names == ["path", "embed(content)"]  # named as written, not after the UDF
    assert table.schema.field(1).type == pa.list_(pa.float32(), 384)
    vectors = as_matrix(table.column(1))
    assert vectors.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The same texts embedded one by one give the same vectors (batching changes nothing).
    content = query(conn, "SELECT content FROM guides ORDER BY path").column(0).to_pylist()
    one = as_matrix(query(conn, "SELECT embed(?) AS v", [content[2]]).column("v"))[0]
    assert float(one @ vectors[2]) > 0.9999


def test_explain_shows_the_model_function(conn):
    """Each model is its own UDF; the call is rewritten to it before planning (EXPLAIN too)."""
    plan = query(conn, "EXPLAIN SELECT path, embed(content, 'minilm_int8') FROM guides")
    text = "\n".join(str(v) for v in plan.column("plan").to_pylist())
    assert "embed:minilm_int8(" in text and "arrow_typeof" in text


def test_cosine_distance_ranks_the_right_guide_first(conn):
    table = query(conn, f"""
        SELECT path, cosine_distance(embed(content), embed('{INCIDENT}')) AS distance
        FROM guides ORDER BY distance LIMIT 1""")
    assert table.column("path").to_pylist() == [POOLER_GUIDE]
    assert table.schema.field("distance").type == pa.float64()
    # Bound as a parameter, with another model: the same guide.
    table = query(conn, "SELECT path FROM guides ORDER BY "
                        "cosine_distance(embed(content, 'minilm_int8'), embed(?, 'minilm_int8')) LIMIT 1",
                  [INCIDENT])
    assert table.column("path").to_pylist() == [POOLER_GUIDE]


# --------------------------------------------------------------------------- (d) predict

def test_predict_equals_scikit_learn(conn, sklearn_models):
    m = sklearn_models
    table = query(conn, "SELECT id, predict('churn', f0, f1, f2, f3) AS label, "
                        "predict('spend', r0, r1, r2) AS spend FROM features ORDER BY id")
    assert table.schema.field("label").type == pa.int64()
    np.testing.assert_array_equal(table.column("label").to_numpy(), m["clf"].predict(m["X"]))
    np.testing.assert_allclose(table.column("spend").to_numpy(),
                               m["reg"].predict(m["Xr"].astype(np.float32)), rtol=1e-4, atol=1e-3)
    # In a filter and an aggregate, integer columns cast to the model's floats.
    count = query(conn, "SELECT count(*) AS n FROM features WHERE predict('churn', f0, f1, f2, n) = 1")
    expected = m["clf"].predict(np.column_stack([m["X"][:, :3], np.arange(len(m["X"])) % 7])).sum()
    assert count.column("n").to_pylist() == [expected]


def test_predict_over_an_embedding(conn, demo_config, tmp_path_factory):
    """A classifier trained on embeddings, fed embed(content): one vector column as the input."""
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx

    table = query(conn, "SELECT path, embed(content) AS v FROM guides ORDER BY path")
    X = as_matrix(table.column("v"))
    y = np.array([int("connection" in p or "slow" in p) for p in table.column("path").to_pylist()])
    clf = LogisticRegression(C=10.0).fit(X, y)
    folder = tmp_path_factory.mktemp("topic")
    (folder / "topic.onnx").write_bytes(to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}})
                                        .SerializeToString())
    config = {"datasets": [{"from": f"file:{demo_config.parent / 'data' / 'guides'}/", "name": "guides"}],
              "models": [{"name": "topic", "from": "file:topic.onnx"}],
              "runtime": {"data_dir": str(data_dir_with_cache(tmp_path_factory, "topic-data"))}}
    with serving(config, folder) as runtime, flightsql.connect(runtime.flight_url, autocommit=True) as local:
        got = query(local, "SELECT path, predict('topic', embed(content)) AS db FROM guides ORDER BY path")
    assert got.column("db").to_pylist() == clf.predict(X).tolist()


# --------------------------------------------------------------------------- (e) errors

@pytest.mark.parametrize("sql, expected", [
    ("SELECT embed('x', 'nope')", "unknown embedding model 'nope'; known: minilm, minilm_int8"),
    ("SELECT predict('nope', 1.0)", "unknown model 'nope'; known: churn, spend"),
    ("SELECT embed()", "embed() takes 1 or 2 arguments, embed(text) or embed(text, 'model'); got 0"),
    ("SELECT embed('a', 'minilm', 'b')", "embed() takes 1 or 2 arguments"),
    ("SELECT predict('churn', f0, f1) FROM features", "predict('churn', ...) takes 4 feature arguments, "
                                                      "or one array of 4 values; got 2"),
    ("SELECT embed(content, path) FROM guides", "the model must be a string literal"),
    ("SELECT predict(f0, f1) FROM features", "predict() takes the model's name as a string literal first"),
    ("SELECT embed(order_id) FROM orders", "embed() takes text, got Int64"),
    ("SELECT embed(42)", "embed() takes text, got Int64"),
    ("SELECT embed(embed('x'))", "embed() cannot take another embed() inside its argument"),
    # the rewrite writes embed's argument twice: nested 16 deep, 351 characters became 4 MB to plan
    ("SELECT " + "embed(arrow_typeof(" * 16 + "'a'" + "))" * 16, "cannot take another embed()"),
    ("SELECT predict('churn', label, f1, f2, f3) FROM features", "coercion from Utf8, Float64, Float64, "
                                                                 "Float64 to the signature Exact(Float64"),
])
def test_bad_calls_get_precise_errors_and_the_server_keeps_serving(conn, sql, expected):
    with conn.cursor() as cursor:
        with pytest.raises(adbc_driver_manager.Error) as raised:
            cursor.execute(sql)
            cursor.fetch_arrow_table()
        message = str(raised.value)
        assert expected in message
        assert "Traceback" not in message and "PyErr" not in message
        assert "UNAVAILABLE" not in message  # the request is at fault: a retry would fail the same way
        cursor.execute("SELECT count(*) FROM guides")
        assert cursor.fetchone() == (6,)


def test_nulls_and_empty_inputs(conn):
    table = query(conn, "SELECT embed(NULL) AS a, embed(CAST(NULL AS VARCHAR)) AS b, embed('') AS c")
    assert table.column("a").null_count == 1 and table.column("b").null_count == 1
    assert table.column("c").null_count == 0
    empty = query(conn, "SELECT embed(content) AS v FROM guides WHERE path = 'none'")
    assert empty.num_rows == 0 and empty.schema.field("v").type == pa.list_(pa.float32(), 384)


# --------------------------------------------------------------------------- defaults and config

def test_minilm_is_there_without_config_and_loads_on_first_use(tmp_path, tmp_path_factory):
    (tmp_path / "notes.csv").write_text("id,note\n1,too many database connections\n2,disk full\n")
    config = {"datasets": [{"from": "file:notes.csv", "name": "notes"}],
              "runtime": {"data_dir": str(data_dir_with_cache(tmp_path_factory, "default-data"))}}
    with serving(config, tmp_path) as runtime:
        assert runtime.models.embedding_names == ["minilm"]
        assert not runtime.models.is_loaded("minilm")  # nothing at startup
        with flightsql.connect(runtime.flight_url, autocommit=True) as conn:
            table = query(conn, "SELECT id FROM notes ORDER BY "
                                "cosine_distance(embed(note), embed('connection pool exhausted')) LIMIT 1")
        assert table.column("id").to_pylist() == [1]
        assert runtime.models.is_loaded("minilm")
        assert runtime.models.embedding_spec("minilm").quantization == "none"


@pytest.mark.parametrize("raw, expected", [
    ({"embeddings": [{"name": "m", "from": "minilm", "params": {"quantization": "int4"}}]},
     "embeddings[0].params.quantization: Input should be 'none' or 'int8'"),
    ({"embeddings": [{"name": "m", "from": "minilm", "params": {"threads": 0}}]},
     "embeddings[0].params.threads: Input should be greater than or equal to 1"),
    ({"embeddings": [{"name": "m", "from": "minilm", "params": {"colour": "blue"}}]},
     "embeddings[0].params.colour: unknown key"),
    ({"embeddings": [{"name": "m", "from": "openai:text-embedding-3-small"}]},
     "embeddings[0].from: expected minilm, huggingface:sentence-transformers/all-MiniLM-L6-v2"),
    ({"embeddings": [{"name": "m", "from": "huggingface:BAAI/bge-small-en-v1.5"}]},
     "embeddings[0].from: only huggingface:sentence-transformers/all-MiniLM-L6-v2 is bundled"),
    ({"embeddings": [{"name": "m", "from": "file:enc.onnx"}]}, "embeddings[0]: an .onnx embedding model "
                                                               "needs params.tokenizer"),
    ({"embeddings": [{"name": "a", "from": "minilm"}, {"name": "a", "from": "minilm"}]},
     "embeddings[1].name: 'a' is already used by embeddings[0]"),
    ({"embeddings": [{"name": "two words", "from": "minilm"}]}, "embeddings[0].name: expected a name"),
    ({"models": [{"name": "m", "from": "file:m.pkl"}]}, "models[0].from: expected 'file:<path>.onnx'"),
    ({"models": [{"name": "m", "from": "file:m.onnx", "params": {"batch_size": 8}}]},
     "models[0].params.batch_size: unknown key"),
])
def test_config_errors_name_the_key(raw, expected, tmp_path):
    with pytest.raises(ConfigError) as raised:
        parse_config(raw, tmp_path, {})
    assert expected in str(raised.value)


def test_config_paths_and_cache_dir(tmp_path):
    from flightdeck.model_functions import model_registry

    loaded = parse_config({
        "embeddings": [{"name": "docs", "from": "file:models/encoder.onnx",
                        "params": {"tokenizer": "models/tokenizer.json", "batch_size": "16"}}],
        "models": [{"name": "churn", "from": "file:churn.onnx", "params": {"threads": "1"}}],
        "runtime": {"data_dir": "state"}}, tmp_path, {})
    registry = model_registry(loaded)
    assert registry.embedding_names == ["docs", "minilm"]  # minilm stays available
    spec = registry.embedding_spec("docs")
    assert (spec.path, spec.tokenizer, spec.batch_size) == (tmp_path / "models/encoder.onnx",
                                                            tmp_path / "models/tokenizer.json", 16)
    assert registry.model_spec("churn").path == tmp_path / "churn.onnx"
    assert registry.model_spec("churn").threads == 1
    assert registry.cache_dir == tmp_path / "state" / "models"
