"""Embedding benchmark: sentences per second through `embed()` over Flight SQL vs onnxruntime
called directly on the same ONNX file, fp32 and int8, short and long texts.

    python -m bench.embeddings [--short 2000] [--long 500] [--repeats 3]

The texts are a Parquet dataset served by a flightdeck process (its own process, ADBC Flight
SQL client), and the query is the everyday one, `SELECT embed(text) FROM short_texts`: a scan,
the UDF over Arrow batches, the vectors streamed back as FixedSizeList<float32, 384>. The
baseline is the least a program can do for the same vectors: tokenizers + one onnxruntime
session on the model file the server uses (same threads, same length-sorted batches of 64,
mean pooling, normalisation), timed in this process while the server idles. The embedder
library in-process is measured too, to tell library overhead from serving overhead, and
sentence-transformers on torch when it is importable (`pip install -e .[bench-torch]`;
skipped with a note otherwise). Each figure is the median of --repeats runs after a warm-up.

Writes bench/results/embeddings.json and embeddings.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import adbc_driver_flightsql.dbapi as flightsql
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import DATA, RESULTS, busy_note, flightdeck_server, progress, sentences

HERE = DATA / "embeddings"
THREADS = 2
BATCH = 64
MODELS = {"fp32": "minilm", "int8": "minilm_int8"}


def write_data(short: int, long: int) -> tuple[Path, dict[str, list[str]]]:
    """The texts as Parquet and a config serving them with an fp32 and an int8 model."""
    HERE.mkdir(parents=True, exist_ok=True)
    texts = {"short": sentences(short, 6, 18, 1), "long": sentences(long, 230, 330, 2)}
    for name, values in texts.items():
        pq.write_table(pa.table({"id": np.arange(len(values)), "text": values}), HERE / f"{name}.parquet")
    config = {
        "datasets": [{"from": f"file:{name}.parquet", "name": f"{name}_texts"} for name in texts],
        "embeddings": [
            {"name": MODELS["fp32"], "from": "minilm", "params": {"threads": THREADS, "batch_size": BATCH}},
            {"name": MODELS["int8"], "from": "minilm",
             "params": {"quantization": "int8", "threads": THREADS, "batch_size": BATCH}},
        ],
        "runtime": {"data_dir": "state"},  # the converted models stay here between runs
    }
    path = HERE / "flightdeck.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path, texts


# --------------------------------------------------------------------------- the direct baseline

class DirectOnnx:
    """tokenizers + onnxruntime on an ONNX file: what embed() computes, with nothing around it."""

    def __init__(self, onnx_path: Path, tokenizer_path: Path, max_seq_length: int = 256):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        self.tokenizer.no_padding()

    def embed(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch_fast(texts)
        out = np.empty((len(texts), 384), np.float32)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            width = max(len(encodings[i].ids) for i in rows)
            ids = np.zeros((len(rows), width), np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for j, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[j, :n] = encodings[i].ids
                mask[j, :n] = 1
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                             "token_type_ids": np.zeros_like(ids)})[0]
            weights = mask.astype(np.float32)
            pooled = (weights[:, :, None] * hidden).sum(axis=1) / weights.sum(axis=1, keepdims=True)
            out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out


# --------------------------------------------------------------------------- measuring

def timed(label: str, n: int, run: Callable[[], object], repeats: int) -> dict:
    run()  # warm-up (and, for the server, the model's first load)
    seconds = []
    for attempt in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
        progress(f"{label}: run {attempt + 1}/{repeats}: {seconds[-1]:.2f} s ({n / seconds[-1]:,.0f} sentences/s)")
    median = statistics.median(seconds)
    return {"seconds": seconds, "median_seconds": median, "sentences_per_second": n / median}


def flight_vectors(conn, sql: str) -> pa.Table:
    with conn.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetch_arrow_table()


def as_matrix(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.values.to_numpy().reshape(len(arr), arr.type.list_size)


def measure(config: Path, texts: dict[str, list[str]], repeats: int) -> dict:
    from inference.registry import ModelRegistry
    from inference.st_dir import bundled_minilm_dir
    from flightdeck.config import load_config
    from flightdeck.model_functions import model_registry

    results: dict = {}
    server = flightdeck_server(config)
    registry: ModelRegistry = model_registry(load_config(config))
    try:
        with flightsql.connect(server.url, autocommit=True) as conn:
            for variant, model in MODELS.items():
                embedder = registry.embedder(model)  # converts into the cache the server reads
                direct = DirectOnnx(embedder.onnx_path, bundled_minilm_dir() / "tokenizer.json")
                for kind, values in texts.items():
                    label, n = f"{variant} {kind}", len(values)
                    sql = f"SELECT embed(text, '{model}') AS v FROM {kind}_texts ORDER BY id"
                    got = as_matrix(flight_vectors(conn, sql).column("v"))
                    agreement = float((got * direct.embed(values)).sum(axis=1).min())
                    progress(f"{label}: {n} texts; server vs direct: min cosine {agreement:.6f}")
                    array = pa.array(values)
                    row = {
                        "texts": n,
                        "mean_chars": float(np.mean([len(t) for t in values])),
                        "model_file": embedder.onnx_path.name,
                        "model_mib": embedder.onnx_path.stat().st_size / 2**20,
                        "min_cosine_server_vs_direct": agreement,
                        "direct_onnxruntime": timed(f"{label} direct onnxruntime", n,
                                                    lambda: direct.embed(values), repeats),
                        "embedder_in_process": timed(f"{label} TextEmbedder in-process", n,
                                                     lambda: embedder.embed(array), repeats),
                        "flight_sql": timed(f"{label} embed() over Flight SQL", n,
                                            lambda: flight_vectors(conn, sql), repeats),
                    }
                    row["ratio_flight_vs_direct"] = (row["flight_sql"]["sentences_per_second"]
                                                     / row["direct_onnxruntime"]["sentences_per_second"])
                    progress(f"{label}: Flight SQL / direct onnxruntime = {row['ratio_flight_vs_direct']:.3f}")
                    results[label] = row
    finally:
        server.stop()
    return results


def measure_torch(texts: dict[str, list[str]], repeats: int) -> dict | None:
    try:
        from sentence_transformers import SentenceTransformer
        import torch
    except ImportError:
        progress("note: sentence-transformers/torch is not importable: the torch comparison is skipped "
                 "(pip install -e '.[bench-torch]' to include it)")
        return None
    from inference.st_dir import bundled_minilm_dir

    torch.set_num_threads(THREADS)
    model = SentenceTransformer(str(bundled_minilm_dir()), device="cpu")
    return {kind: timed(f"fp32 {kind} sentence-transformers (torch)", len(values),
                        lambda values=values: model.encode(values, batch_size=BATCH, normalize_embeddings=True),
                        repeats) for kind, values in texts.items()}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    torch = report.get("sentence_transformers_torch") or {}
    series = [("direct_onnxruntime", "onnxruntime directly", "#718096"),
              ("embedder_in_process", "TextEmbedder in-process", "#90cdf4"),
              ("flight_sql", "embed() over Flight SQL (ADBC)", "#2b6cb0")]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, kind in zip(axes, ("short", "long")):
        labels = [label for label in rows if label.endswith(kind)]
        width = 0.8 / (len(series) + (1 if torch else 0))
        x = np.arange(len(labels))
        for offset, (key, name, color) in enumerate(series):
            values = [rows[label][key]["sentences_per_second"] for label in labels]
            bars = axis.bar(x + offset * width, values, width, label=name, color=color)
            axis.bar_label(bars, labels=[f"{v:.0f}" + (f"\n{rows[label]['ratio_flight_vs_direct']:.2f}x"
                                                       if key == "flight_sql" else "")
                                         for v, label in zip(values, labels)], padding=2, fontsize=8)
        if torch:
            values = [torch[kind]["sentences_per_second"] if label.startswith("fp32") else 0 for label in labels]
            axis.bar(x + len(series) * width, values, width, label="sentence-transformers (torch)",
                     color="#ed8936")
        axis.set_xticks(x + width * (len(series) - 1) / 2, [label.split()[0] for label in labels])
        first = rows[labels[0]]
        axis.set_title(f"{kind}: {first['texts']} texts, ~{first['mean_chars']:.0f} characters")
        axis.set_ylabel("sentences per second (median)")
        axis.margins(y=0.2)
    axes[0].legend(loc="upper left", fontsize=8)
    figure.suptitle(f"all-MiniLM-L6-v2, {THREADS} onnxruntime threads; "
                    "under the Flight SQL bars: its ratio to onnxruntime directly")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=2000)
    parser.add_argument("--long", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import onnxruntime

    config, texts = write_data(args.short, args.long)
    progress(f"{args.short} short and {args.long} long texts; server config {config}")
    load_before = os.getloadavg()[0]
    if note := busy_note():
        progress(note)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyarrow": pa.__version__,
                    "onnxruntime": onnxruntime.__version__, "threads": THREADS, "batch_size": BATCH},
        "results": measure(config, texts, args.repeats),
        "sentence_transformers_torch": measure_torch(texts, args.repeats),
    }
    report["machine"]["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embeddings.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "embeddings.png")
    summary = {label: {"flight_sql": round(row["flight_sql"]["sentences_per_second"], 1),
                       "direct_onnxruntime": round(row["direct_onnxruntime"]["sentences_per_second"], 1),
                       "embedder_in_process": round(row["embedder_in_process"]["sentences_per_second"], 1),
                       "ratio_flight_vs_direct": round(row["ratio_flight_vs_direct"], 3)}
               for label, row in report["results"].items()}
    if report["sentence_transformers_torch"]:
        summary["sentence_transformers_torch"] = {
            k: round(v["sentences_per_second"], 1) for k, v in report["sentence_transformers_torch"].items()}
    print(json.dumps(summary, indent=2))
    progress(f"wrote {RESULTS / 'embeddings.json'} and {RESULTS / 'embeddings.png'}")


if __name__ == "__main__":
    main()
