"""Local inference models: the MiniLM encoder built from safetensors, exported ONNX files,
tabular models from scikit-learn, and the registry that names them. Real models, no mocks."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pytest
from onnx import TensorProto, helper, numpy_helper

from inference.bert_onnx import cache_folder, export_onnx
from inference.embedder import TextEmbedder
from inference.errors import ModelError
from inference.reference import load_reference
from inference.registry import ModelRegistry
from inference.st_dir import bundled_minilm_dir, load_st_dir
from inference.tabular import TabularModel

REFERENCE = load_reference()
CASE_IDS = [f"{i}:{t[:24]!r}" for i, t in enumerate(REFERENCE.texts)]


def model_cache(tmp_path_factory) -> Path:
    """One conversion cache for the whole pytest session (both inference test files)."""
    return tmp_path_factory.getbasetemp() / "inference-model-cache"


def as_matrix(arr: pa.FixedSizeListArray) -> np.ndarray:
    """[rows, dim], null rows included (flatten() would drop them)."""
    dim = arr.type.list_size
    return arr.values.slice(arr.offset * dim, len(arr) * dim).to_numpy().reshape(len(arr), dim)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return model_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def fp32(cache_dir) -> TextEmbedder:
    return TextEmbedder.from_sentence_transformers(bundled_minilm_dir(), cache_dir, threads=2)


@pytest.fixture(scope="module")
def int8(cache_dir) -> TextEmbedder:
    return TextEmbedder.from_sentence_transformers(bundled_minilm_dir(), cache_dir, quantization="int8", threads=2)


@pytest.fixture(scope="module")
def fp32_cosines(fp32) -> np.ndarray:
    return REFERENCE.cosines(as_matrix(fp32.embed(pa.array(REFERENCE.texts))))


@pytest.fixture(scope="module")
def int8_cosines(int8) -> np.ndarray:
    return REFERENCE.cosines(as_matrix(int8.embed(pa.array(REFERENCE.texts))))


# --------------------------------------------------------------------------- reference

def test_reference_fixture_shape():
    assert len(REFERENCE.texts) >= 20 and REFERENCE.embeddings.shape[1] == 384
    assert "" in REFERENCE.texts  # edge cases are part of the set


@pytest.mark.parametrize("case", range(len(REFERENCE.texts)), ids=CASE_IDS)
def test_fp32_matches_sentence_transformers(fp32_cosines, case):
    assert fp32_cosines[case] >= 0.999


@pytest.mark.parametrize("case", range(len(REFERENCE.texts)), ids=CASE_IDS)
def test_int8_matches_sentence_transformers(int8_cosines, case):
    assert int8_cosines[case] >= 0.99


def test_model_facts(fp32):
    st = load_st_dir(bundled_minilm_dir())
    assert (st.dim, st.max_seq_length, st.pooling, st.normalize) == (384, 256, "mean", True)
    assert fp32.dim == 384 and fp32.type == pa.list_(pa.float32(), 384)
    graph = onnx.load(str(fp32.onnx_path), load_external_data=False)
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert any(n.op_type == "LayerNormalization" for n in graph.graph.node)


def test_int8_is_smaller_and_agrees_with_fp32(fp32, int8):
    assert int8.onnx_path.stat().st_size < 0.8 * fp32.onnx_path.stat().st_size
    texts = pa.array([f"incident {i}: order latency spike on replica {i % 3}" for i in range(50)])
    cos = (as_matrix(fp32.embed(texts)) * as_matrix(int8.embed(texts))).sum(axis=1)
    assert cos.min() > 0.99


# --------------------------------------------------------------------------- embed() behaviour

def test_nulls_empty_strings_and_chunked_input(fp32):
    out = fp32.embed(pa.chunked_array([["order latency is high", None], ["", None, "a"]]))
    assert isinstance(out, pa.FixedSizeListArray) and len(out) == 5
    assert out.is_valid().to_pylist() == [True, False, True, False, True]
    matrix = as_matrix(out)
    alone = as_matrix(fp32.embed(pa.array(["order latency is high", "", "a"])))
    np.testing.assert_allclose(matrix[[0, 2, 4]], alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(matrix[[0, 2, 4]], axis=1), 1.0, atol=1e-5)


def test_empty_and_all_null_and_string_types(fp32):
    assert len(fp32.embed(pa.array([], pa.string()))) == 0
    assert fp32.embed(pa.array([], pa.string())).type == fp32.type
    assert fp32.embed(pa.array([None, None], pa.string())).null_count == 2
    large = fp32.embed(pa.array(["disk full"], pa.large_string()))
    view = fp32.embed(pa.array(["disk full"], pa.string_view()))
    np.testing.assert_allclose(as_matrix(large), as_matrix(view))
    with pytest.raises(ModelError, match="needs text"):
        fp32.embed(pa.array([1, 2]))


def test_sub_batches_and_length_sorting_do_not_change_results(cache_dir):
    texts = pa.array(REFERENCE.texts)
    one = TextEmbedder.from_sentence_transformers(bundled_minilm_dir(), cache_dir, batch_size=1)
    seven = TextEmbedder.from_sentence_transformers(bundled_minilm_dir(), cache_dir, batch_size=7)
    np.testing.assert_allclose(as_matrix(one.embed(texts)), as_matrix(seven.embed(texts)), atol=2e-5)


def test_concurrent_calls_share_one_session(fp32):
    texts = pa.array(REFERENCE.texts[:8])
    expected = as_matrix(fp32.embed(texts))
    results, errors = [], []

    def work():
        try:
            results.append(as_matrix(fp32.embed(texts)))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-5)


# CPU the process burns while it sleeps after each of three embeddings (the least of the three).
IDLE_CPU_PROBE = """
import sys, time
from inference.embedder import TextEmbedder
from inference.st_dir import bundled_minilm_dir, load_st_dir
embedder = TextEmbedder(sys.argv[1], load_st_dir(bundled_minilm_dir()).tokenizer, threads=2)
burnt = []
for i in range(3):
    embedder.embed_numpy([f"a query text {i}"])
    started = time.process_time()
    time.sleep(0.05)
    burnt.append(time.process_time() - started)
print(min(burnt))
"""


def test_model_threads_sleep_when_a_run_ends(fp32):
    """onnxruntime's workers otherwise spin ~40 ms after each run: in a server, a core taken from
    the query that just embedded its text. Its own process: no other test's threads are counted."""
    probe = subprocess.run([sys.executable, "-c", IDLE_CPU_PROBE, str(fp32.onnx_path)], capture_output=True,
                           text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert float(probe.stdout.split()[-1]) < 0.005


# --------------------------------------------------------------------------- conversion cache

def test_cache_is_reused_not_rebuilt(cache_dir, fp32, int8, caplog):
    st = load_st_dir(bundled_minilm_dir())
    folder = cache_folder(st, cache_dir)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}
    assert set(before) == {"model.onnx", "model.int8.onnx"}
    with caplog.at_level(logging.INFO, logger="inference.bert_onnx"):
        again = TextEmbedder.from_sentence_transformers(bundled_minilm_dir(), cache_dir, quantization="int8")
        assert export_onnx(st, cache_dir) == fp32.onnx_path
    assert again.onnx_path == int8.onnx_path
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")} == before
    assert not [r for r in caplog.records if "building" in r.getMessage()]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cache_key_follows_the_weights(tmp_path, cache_dir):
    """A folder with different weights gets its own cache entry (and the build logs)."""
    st = load_st_dir(bundled_minilm_dir())
    copy = tmp_path / "model"
    shutil.copytree(st.path, copy)
    changed = load_st_dir(copy)
    assert cache_folder(changed, cache_dir) == cache_folder(st, cache_dir)  # same bytes, same key
    with open(copy / "model.safetensors", "r+b") as f:  # flip one byte in the last tensor's data
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert cache_folder(load_st_dir(copy), cache_dir) != cache_folder(st, cache_dir)


# --------------------------------------------------------------------------- other model sources

def test_sentence_transformers_folder_follows_its_modules(tmp_path, cache_dir):
    """A local folder works like the bundled one; without a Normalize module the vectors
    are not normalised but point the same way."""
    src = bundled_minilm_dir()
    folder = tmp_path / "st"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json"):
        (folder / name).symlink_to(src / name)
    shutil.copytree(src / "1_Pooling", folder / "1_Pooling")
    modules = [m for m in json.loads((src / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))
    registry = ModelRegistry([{"name": "local", "from": f"file:{folder}"}], cache_dir=cache_dir)
    embedder = registry.embedder("local")
    assert not embedder.normalize
    matrix = as_matrix(embedder.embed(pa.array(REFERENCE.texts[:5])))
    assert np.abs(np.linalg.norm(matrix, axis=1) - 1).max() > 0.01
    assert REFERENCE.cosines(matrix, cases=range(5)).min() >= 0.999
    assert registry.embedding_spec("local").source == "st_dir"


def test_exported_onnx_file_with_tokenizer(fp32, tmp_path):
    """An .onnx file plus tokenizer.json, as exported elsewhere (here: a copy of ours)."""
    shutil.copy(fp32.onnx_path, tmp_path / "encoder.onnx")
    tokenizer = bundled_minilm_dir() / "tokenizer.json"
    registry = ModelRegistry([{"name": "exported", "from": "file:encoder.onnx",
                               "params": {"tokenizer": str(tokenizer), "batch_size": "16"}}], base_dir=tmp_path)
    embedder = registry.embedder("exported")
    # The tokenizer sits in a sentence-transformers folder: its pooling, Normalize and
    # max_seq_length (256, not tokenizer.json's 128) apply.
    assert (embedder.pooling, embedder.normalize, embedder.max_seq_length, embedder.batch_size) == \
        ("mean", True, 256, 16)
    assert REFERENCE.cosines(as_matrix(embedder.embed(pa.array(REFERENCE.texts)))).min() >= 0.999


def test_onnx_file_with_sentence_embedding_output(tmp_path):
    """A model that pools inside the graph ([batch, dim] output) and takes no token_type_ids."""
    vocab, dim = 30522, 8
    table = np.random.default_rng(0).standard_normal((vocab, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["sentence_embedding"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "pooled",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["b", "d"])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2], np.int64), "axis2"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "pooled.onnx"))
    shutil.copy(bundled_minilm_dir() / "tokenizer.json", tmp_path / "tokenizer.json")

    embedder = TextEmbedder.from_onnx(tmp_path / "pooled.onnx", tmp_path / "tokenizer.json", normalize=False)
    assert embedder.dim == dim  # discovered by a probe: the output's last axis is symbolic
    out = as_matrix(embedder.embed(pa.array(["hello world", "", None]).drop_null()))
    ids = [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    np.testing.assert_allclose(out[0], table[ids].sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(out[1], table[[101, 102]].sum(axis=0), rtol=1e-5)


# --------------------------------------------------------------------------- registry

def test_registry_names_lazy_loading_and_sharing(cache_dir):
    registry = ModelRegistry.from_config({"embeddings": [
        {"name": "minilm", "from": "huggingface:sentence-transformers/all-MiniLM-L6-v2"},
        {"name": "small", "from": "minilm", "params": {"quantization": "int8", "threads": 1, "batch_size": 32}},
    ]}, cache_dir=cache_dir)
    assert registry.embedding_names == ["minilm", "small"]
    assert not registry.is_loaded("minilm")
    got = []
    threads = [threading.Thread(target=lambda: got.append(registry.embedder("small"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(e is got[0] for e in got)
    assert got[0].onnx_path.name == "model.int8.onnx" and got[0].batch_size == 32
    assert registry.is_loaded("small") and not registry.is_loaded("minilm")


def test_registry_default_cache_dir(tmp_path):
    registry = ModelRegistry(base_dir=tmp_path)
    assert registry.cache_dir == tmp_path / ".flightdeck" / "models"


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "from": "huggingface:BAAI/bge-small-en-v1.5"}, "cannot be downloaded"),
    ({"name": "x", "from": "openai:text-embedding-3-small"}, "`from` must be"),
    ({"name": "x", "from": "minilm", "params": {"quantization": "int4"}}, "int8 or none"),
    ({"name": "x", "from": "minilm", "params": {"threads": "two"}}, "whole number"),
    ({"name": "x", "from": "minilm", "params": {"colour": "blue"}}, "unknown param"),
    ({"name": "x", "from": "file:enc.onnx"}, "needs params.tokenizer"),
    ({"name": "x", "from": "file:enc.onnx", "params": {"tokenizer": "t.json", "quantization": "int8"}},
     "quantization applies"),
    ({"from": "minilm"}, "`name` is required"),
    ({"name": "x", "from": "minilm", "params": {"tokenizer": "t.json"}}, "only for .onnx files"),
    ({"name": "x", "from": "file:models/st", "params": {"pooling": "cls"}}, "only for .onnx files"),
])
def test_registry_rejects_bad_embedding_config(entry, message):
    with pytest.raises(ModelError, match=message):
        ModelRegistry([entry])


def test_registry_errors_name_the_model_and_the_file(tmp_path):
    registry = ModelRegistry(
        [{"name": "docs", "from": "file:models/missing-folder"}],
        [{"name": "churn", "from": "file:models/churn.onnx"}], base_dir=tmp_path)
    with pytest.raises(ModelError, match=r"unknown embedding model 'nope'; known: docs"):
        registry.embedder("nope")
    with pytest.raises(ModelError, match=r"unknown model 'nope'; known: churn"):
        registry.model("nope")
    with pytest.raises(ModelError, match=r"embedding model 'docs' .*missing-folder does not exist"):
        registry.embedder("docs")
    with pytest.raises(ModelError, match=r"model 'churn' .*churn.onnx does not exist"):
        registry.model("churn")
    with pytest.raises(ModelError, match="defined twice"):
        ModelRegistry([{"name": "a", "from": "minilm"}, {"name": "a", "from": "minilm"}])
    with pytest.raises(ModelError, match=r"file:<path>\.onnx"):
        ModelRegistry(models=[{"name": "m", "from": "file:model.pkl"}])


# --------------------------------------------------------------------------- tabular models

@pytest.fixture(scope="module")
def sklearn_models(tmp_path_factory):
    from sklearn.datasets import make_classification, make_regression
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import Ridge
    from skl2onnx import to_onnx

    folder = tmp_path_factory.mktemp("tabular")
    X, y = make_classification(n_samples=400, n_features=5, n_informative=3, random_state=0)
    X = X.astype(np.float32)
    clf = RandomForestClassifier(n_estimators=15, max_depth=6, random_state=0).fit(X, y)
    names = np.array(["stay", "churn"])
    clf_str = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0).fit(X, names[y])
    Xr, yr = make_regression(n_samples=300, n_features=4, noise=0.1, random_state=0)
    Xr = Xr.astype(np.float32)
    reg = Ridge(alpha=0.5).fit(Xr, yr)
    files = {
        "clf": to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}}),
        "clf_zipmap": to_onnx(clf, X[:1]),
        "clf_str": to_onnx(clf_str, X[:1], options={id(clf_str): {"zipmap": False}}),
        "reg": to_onnx(reg, Xr[:1]),
    }
    for name, proto in files.items():
        (folder / f"{name}.onnx").write_bytes(proto.SerializeToString())
    return {"folder": folder, "X": X, "clf": clf, "clf_str": clf_str, "Xr": Xr, "reg": reg}


def batch_of(X: np.ndarray) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(X[:, j]) for j in range(X.shape[1])],
                                      names=[f"f{j}" for j in range(X.shape[1])])


def test_classifier_labels_and_probabilities_match_sklearn(sklearn_models):
    m, X = sklearn_models, sklearn_models["X"]
    model = TabularModel(m["folder"] / "clf.onnx")
    assert model.n_features == 5 and list(model.classes) == [0, 1]
    labels = model.predict(batch_of(X))
    assert labels.type == pa.int64()
    np.testing.assert_array_equal(labels.to_numpy(), m["clf"].predict(X))
    proba = model.predict_proba(batch_of(X))
    assert proba.type == pa.list_(pa.float32(), 2)
    np.testing.assert_allclose(as_matrix(proba), m["clf"].predict_proba(X), atol=1e-5)
    # ZipMap output (the skl2onnx default) gives the same probabilities.
    zipmap = TabularModel(m["folder"] / "clf_zipmap.onnx")
    np.testing.assert_allclose(as_matrix(zipmap.predict_proba(batch_of(X[:20]))), m["clf"].predict_proba(X[:20]),
                               atol=1e-5)


def test_string_labels(sklearn_models):
    m, X = sklearn_models, sklearn_models["X"]
    model = TabularModel(m["folder"] / "clf_str.onnx")
    labels = model.predict(batch_of(X))
    assert labels.type == pa.string()
    assert labels.to_pylist() == m["clf_str"].predict(X).tolist()


def test_regressor_matches_sklearn_from_any_column_layout(sklearn_models):
    m, Xr = sklearn_models, sklearn_models["Xr"]
    model = TabularModel(m["folder"] / "reg.onnx")
    expected = m["reg"].predict(Xr)
    from_batch = model.predict(batch_of(Xr))
    assert from_batch.type == pa.float32()
    np.testing.assert_allclose(from_batch.to_numpy(), expected, rtol=1e-4, atol=1e-3)
    # float64 columns in a list, chunked, are converted to the model's float32
    cols = [pa.chunked_array([Xr[:100, j].astype(np.float64), Xr[100:, j].astype(np.float64)]) for j in range(4)]
    np.testing.assert_allclose(model.predict(cols).to_numpy(), expected, rtol=1e-4, atol=1e-3)
    # one FixedSizeList feature-vector column, sliced (non-zero offset)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(Xr.reshape(-1)), 4)
    np.testing.assert_allclose(model.predict([vectors.slice(10, 50)]).to_numpy(), expected[10:60],
                               rtol=1e-4, atol=1e-3)


def test_null_features_give_null_predictions_and_errors_are_clear(sklearn_models):
    m, Xr = sklearn_models, sklearn_models["Xr"]
    model = TabularModel(m["folder"] / "reg.onnx")
    cols = [pa.array(Xr[:6, j]) for j in range(4)]
    cols[1] = pa.array([Xr[0, 1], None, Xr[2, 1], Xr[3, 1], None, Xr[5, 1]], pa.float32())
    out = model.predict(cols)
    assert out.is_valid().to_pylist() == [True, False, True, True, False, True]
    np.testing.assert_allclose(out.drop_null().to_numpy(), m["reg"].predict(Xr[[0, 2, 3, 5]]), rtol=1e-4, atol=1e-3)
    assert len(model.predict(batch_of(Xr[:0]))) == 0
    with pytest.raises(ModelError, match="expects 4 features"):
        model.predict(batch_of(Xr[:, :3]))
    with pytest.raises(ModelError, match="numeric"):
        model.predict([pa.array(["a"])] * 4)
    with pytest.raises(ModelError, match="no probability output"):
        model.predict_proba(batch_of(Xr[:3]))


def test_registry_tabular_model(sklearn_models):
    m = sklearn_models
    registry = ModelRegistry(models=[{"name": "churn", "from": "file:clf.onnx", "params": {"threads": 1}}],
                             base_dir=m["folder"])
    assert registry.model_names == ["churn"]
    model = registry.model("churn")
    assert model is registry.model("churn")
    np.testing.assert_array_equal(model.predict(batch_of(m["X"][:30])).to_numpy(), m["clf"].predict(m["X"][:30]))


def test_max_seq_length_override_truncates(cache_dir):
    long_text = REFERENCE.texts[-1]
    assert len(long_text) > 2000  # the fixture's long case: well past 256 tokens
    registry = ModelRegistry([{"name": "short", "from": "minilm", "params": {"max_seq_length": 16}},
                              {"name": "too_long", "from": "minilm", "params": {"max_seq_length": 600}}],
                             cache_dir=cache_dir)
    short = registry.embedder("short")
    assert short.max_seq_length == 16
    cut = REFERENCE.cosines(as_matrix(short.embed(pa.array([long_text]))), cases=[len(REFERENCE.texts) - 1])
    assert cut[0] < 0.999  # fewer tokens seen than the reference saw
    with pytest.raises(ModelError, match="exceeds the model's 512 positions"):
        registry.embedder("too_long")
