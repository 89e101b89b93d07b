"""Generated embedding-like vectors for the search benchmarks (no downloads).

Sentence embeddings are far from uniform: texts about one topic crowd together, and within
a topic they vary along a few directions. So: topic centres on the unit sphere, each vector
its topic's centre plus a spread in a low-dimensional subspace plus isotropic noise, then
normalised. Queries come from the same distribution, so their neighbours are near-ties
inside a topic, the case that makes an approximate index miss.
"""
from __future__ import annotations

import numpy as np

DIM = 384  # MiniLM's
TOPICS = 1024
SUBSPACE = 48


def unit_vectors(rows: int, seed: int = 7, dim: int = DIM, slice_rows: int = 100_000) -> np.ndarray:
    """[rows, dim] float32 unit vectors; the same seed gives the same topics."""
    topics = np.random.default_rng(12345)
    centres = _normalised(topics.standard_normal((TOPICS, dim), dtype=np.float32))
    basis = topics.standard_normal((SUBSPACE, dim), dtype=np.float32) / np.sqrt(SUBSPACE)
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, slice_rows):
        n = min(slice_rows, rows - start)
        spread = rng.standard_normal((n, SUBSPACE), dtype=np.float32) @ basis
        noise = rng.standard_normal((n, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
        out[start:start + n] = _normalised(centres[rng.integers(0, TOPICS, n)] + 0.8 * spread + noise)
    return out


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, slice_rows: int = 200_000) -> np.ndarray:
    """[queries, k] row numbers of the exact top k by cosine (unit vectors), best first."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), slice_rows):
        scores = queries @ vectors[start:start + slice_rows].T
        ids = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        scores, ids = np.hstack([best_scores, scores]), np.hstack([best_ids, ids])
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    return best_ids


def recall_at_k(found: list[np.ndarray], exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))


def _normalised(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)
