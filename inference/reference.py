"""Reference embeddings to check a model against (tests/fixtures/minilm_reference.json, a copy of
shared/fixtures/minilm_reference.json).

Kept in the package rather than in one test file because several suites compare against
the same file: the library tests here, and end-to-end tests that embed the same texts
through SQL over Flight. The JSON is {"model", "produced_with", "dimensions",
"cases": [{"text", "embedding"}]}, produced by sentence-transformers itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

# A copy of shared/fixtures/minilm_reference.json ships with the tests, so a fresh clone
# anywhere has it; FLIGHTDECK_REFERENCE_DIR points elsewhere (e.g. the shared folder itself).
_DEFAULT_FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


@dataclass(frozen=True)
class ReferenceSet:
    model: str
    produced_with: str
    texts: list[str]
    embeddings: np.ndarray   # [cases, dim] float32

    def cosines(self, embeddings: np.ndarray, cases: Sequence[int] | None = None) -> np.ndarray:
        """Cosine similarity of each row of `embeddings` to its reference row (the rows of
        `cases`, when only some texts were embedded)."""
        got = np.asarray(embeddings, np.float64)
        ref = self.embeddings if cases is None else self.embeddings[list(cases)]
        ref = ref.astype(np.float64)
        denom = np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1)
        return (got * ref).sum(axis=1) / np.maximum(denom, 1e-12)


def reference_path(name: str = "minilm_reference.json") -> Path:
    return Path(os.environ.get("FLIGHTDECK_REFERENCE_DIR", _DEFAULT_FIXTURES)) / name


def load_reference(path: str | Path | None = None) -> ReferenceSet:
    data = json.loads(Path(path or reference_path()).read_text(encoding="utf-8"))
    cases = data["cases"]
    return ReferenceSet(
        model=data.get("model", ""), produced_with=data.get("produced_with", ""),
        texts=[c["text"] for c in cases],
        embeddings=np.array([c["embedding"] for c in cases], np.float32).reshape(len(cases), -1))
