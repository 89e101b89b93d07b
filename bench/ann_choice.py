"""Which approximate (HNSW) index library: build rows/s, query latency and recall@10 of each
installed candidate (usearch, faiss-cpu, hnswlib) on the same generated vectors, with the
same graph settings, one thread each. Exact search (numpy) is the reference and baseline.

    python -m bench.ann_choice [--rows 50000] [--queries 200]

Libraries that are not installed are reported as such (flightdeck depends on usearch only;
the comparison was run once in a scratch virtualenv holding all three).
Writes bench/results/ann_choice.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from bench.common import RESULTS, percentile, progress
from bench.vectors import DIM, exact_top_k, recall_at_k, unit_vectors

M, EF_ADD, EF_SEARCH, K = 16, 64, 128, 10


def build_usearch(vectors: np.ndarray):
    from usearch.index import Index

    index = Index(ndim=DIM, metric="cos", dtype="f16", connectivity=M, expansion_add=EF_ADD,
                  expansion_search=EF_SEARCH)
    index.add(np.arange(len(vectors)), vectors, threads=1)
    return lambda q: np.asarray(index.search(q, K).keys, np.int64)


def build_faiss(vectors: np.ndarray):
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.IndexHNSWFlat(DIM, M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_ADD
    index.add(vectors)
    index.hnsw.efSearch = EF_SEARCH
    return lambda q: index.search(q[None], K)[1][0]


def build_hnswlib(vectors: np.ndarray):
    import hnswlib

    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=len(vectors), ef_construction=EF_ADD, M=M)
    index.set_num_threads(1)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(EF_SEARCH)
    return lambda q: index.knn_query(q, K)[0][0].astype(np.int64)


def build_exact(vectors: np.ndarray):
    def search(q):
        scores = vectors @ q
        top = np.argpartition(-scores, K)[:K]
        return top[np.argsort(-scores[top])]
    return search


CANDIDATES = {"usearch": build_usearch, "faiss-cpu": build_faiss, "hnswlib": build_hnswlib, "exact (numpy)": build_exact}


def measure(build, vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray) -> dict:
    started = time.perf_counter()
    search = build(vectors)
    build_s = time.perf_counter() - started
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(search(q))
        times.append((time.perf_counter() - started) * 1000)
    return {"build_rows_per_s": round(len(vectors) / build_s), "p50_ms": round(percentile(times, 50), 3),
            "p99_ms": round(percentile(times, 99), 3), f"recall_at_{K}": round(recall_at_k(found, exact), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    vectors, queries = unit_vectors(args.rows), unit_vectors(args.queries, seed=99)
    exact = exact_top_k(vectors, queries, K)
    report = {"rows": args.rows, "dim": DIM, "k": K, "settings": {"M": M, "ef_construction": EF_ADD,
              "ef_search": EF_SEARCH, "threads": 1}, "machine": f"{platform.machine()}, shared cores", "libraries": {}}
    for name, build in CANDIDATES.items():
        try:
            report["libraries"][name] = measure(build, vectors, queries, exact)
        except ImportError:
            report["libraries"][name] = "not installed"
        progress(f"{name}: {report['libraries'][name]}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ann_choice.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["libraries"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
