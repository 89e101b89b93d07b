"""Vector, full-text and hybrid search, and Markdown chunking, including retrieval over the
demo's runbook guides with the real MiniLM model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from inference.chunking import chunk_document, chunk_markdown, chunk_text
from inference.embedder import TextEmbedder
from inference.errors import ModelError
from inference.search import GATHER_ROWS, SearchResult, TextIndex, VectorIndex, reciprocal_rank_fusion
from inference.st_dir import bundled_minilm_dir

GUIDES = sorted((Path(__file__).resolve().parent.parent / "flightdeck" / "demo" / "guides").glob("*.md"))
POOLER = "connection-pooler-transaction-mode"
QUERY = "orders failing after scaling to three replicas: too many database connections"


def fixed_size(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.astype(np.float32).reshape(-1)), matrix.shape[1])


# --------------------------------------------------------------------------- VectorIndex

def test_vector_index_ranks_by_cosine_with_deterministic_ties():
    vectors = np.array([[1, 0], [0, 1], [1, 1], [2, 0], [-1, 0]], np.float32)
    index = VectorIndex(fixed_size(vectors))
    result = index.search([1, 0], k=3)
    # rows 0 and 3 point the same way (cosine 1, length does not matter); tie -> lower id first
    assert result.row_ids.tolist() == [0, 3, 2]
    np.testing.assert_allclose(result.scores, [1, 1, np.sqrt(0.5)], rtol=1e-6)
    assert len(index.search([1, 0], k=50)) == 5
    assert index.search([1, 0], k=0).row_ids.tolist() == []
    table = result.to_arrow()
    assert table.column_names == ["row_id", "score"] and table.num_rows == 3


def test_vector_index_candidates_apply_before_ranking():
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((1000, 16)).astype(np.float32)
    query = vectors[123] + 0.01
    index = VectorIndex(fixed_size(vectors))
    assert index.search(query, k=1).row_ids.tolist() == [123]
    # A WHERE clause as a boolean mask over the same rows: only even rows qualify.
    mask = np.arange(1000) % 2 == 0
    filtered = index.search(query, k=10, candidates=pa.array(mask))
    assert len(filtered) == 10 and all(r % 2 == 0 for r in filtered.row_ids)
    brute = np.flatnonzero(mask)[np.argsort(-(vectors[mask] @ query / np.linalg.norm(vectors[mask], axis=1)))][:10]
    assert filtered.row_ids.tolist() == brute.tolist()
    # Row-id subsets, small (gathered) and large (masked) take different paths; same answer.
    small = index.search(query, k=3, candidates=[5, 123, 999, 5000])
    assert set(small.row_ids.tolist()) == {5, 123, 999} and small.row_ids[0] == 123
    large = index.search(query, k=3, candidates=range(0, 1000, 2))
    assert large.row_ids.tolist() == brute[:3].tolist()
    assert len(index.search(query, k=5, candidates=[])) == 0


def test_vector_index_scores_many_candidates_block_by_block_as_the_full_product_does():
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((20_000, 32)).astype(np.float32)
    index = VectorIndex(vectors)
    query = rng.standard_normal(32).astype(np.float32)
    cosines = vectors @ query / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)
    kept = np.flatnonzero(rng.random(20_000) < 0.2)  # about 4,000 rows: several blocks, gathered
    assert GATHER_ROWS < len(kept) < len(index) // 2
    expected = kept[np.argsort(-cosines[kept], kind="stable")][:25]
    for candidates in (kept, kept[::-1], np.repeat(kept, 2),
                       np.concatenate([kept, kept[:500], [-3, 20_000, 99_999]])):
        found = index.search(query, k=25, candidates=candidates)
        assert found.row_ids.tolist() == expected.tolist()
        np.testing.assert_allclose(found.scores, cosines[expected], rtol=1e-5)


def test_vector_index_custom_row_ids_nulls_and_chunks():
    vectors = pa.chunked_array([
        fixed_size(np.array([[1, 0, 0], [0, 1, 0]], np.float32)),
        pa.FixedSizeListArray.from_arrays(pa.array(np.array([1, 1, 0, 0, 0, 0, 0, 0, 1], np.float32)), 3,
                                          mask=pa.array([False, True, False])),
    ])
    index = VectorIndex(vectors, row_ids=pa.array([100, 7, 42, 13, 900]))
    assert index.search([1, 0.1, 0], k=5).row_ids.tolist() == [100, 42, 7, 900]  # null row 13 never matches
    assert index.search([1, 0, 0], k=5, candidates={7, 900, 12345}).row_ids.tolist() == [7, 900]
    zero = VectorIndex(np.zeros((2, 3), np.float32))
    assert len(zero.search([1, 0, 0])) == 0  # zero vectors have no direction
    with pytest.raises(ModelError, match="dimensions"):
        index.search([1, 0], k=1)
    with pytest.raises(ModelError, match="row ids"):
        VectorIndex(np.ones((3, 2)), row_ids=[1, 2])


# --------------------------------------------------------------------------- TextIndex

@pytest.fixture
def text_index() -> TextIndex:
    index = TextIndex()
    index.add([1, 2, 3, 4], [
        "PgBouncer in session mode exhausts database connections",
        "Disk full on the logging node",
        "Too many connections: the database refuses new clients",
        None,
    ])
    return index


def test_text_index_bm25_ranking_and_stemming(text_index):
    assert len(text_index) == 3  # the null text is not indexed
    result = text_index.search("connection", k=10)
    assert set(result.row_ids.tolist()) == {1, 3}  # "connections" stems to the query's word
    assert (np.diff(result.scores) <= 0).all() and (result.scores > 0).all()
    assert text_index.search("pgbouncer connections", k=10).row_ids[0] == 1
    assert len(text_index.search("kubernetes", k=10)) == 0


def test_text_index_plain_queries_tolerate_syntax_characters(text_index):
    # ':' is field syntax and capital OR an operator in tantivy's language; plain mode ignores both.
    result = text_index.search("scaling to three replicas: too many database connections OR (disk)", k=3)
    assert result.row_ids[0] == 3
    assert len(text_index.search("?!:", k=3)) == 0
    assert text_index.search('"logging node"', k=3, syntax="tantivy").row_ids.tolist() == [2]
    with pytest.raises(ModelError, match="invalid full-text query"):
        text_index.search("nosuchfield:value", syntax="tantivy")


def test_text_index_updates_deletes_and_candidates(text_index):
    text_index.add([2], ["database connections on the logging node"])  # replaces row 2's text
    assert len(text_index) == 3
    assert len(text_index.search("disk", k=10)) == 0
    assert 2 in text_index.search("connections", k=10).row_ids
    text_index.delete([1, 99])
    assert 1 not in text_index.search("connections", k=10).row_ids
    restricted = text_index.search("connections", k=10, candidates=np.array([3]))
    unrestricted = text_index.search("connections", k=10)
    assert restricted.row_ids.tolist() == [3]
    # The candidate filter does not change BM25 scores.
    assert restricted.scores[0] == pytest.approx(unrestricted.scores[unrestricted.row_ids.tolist().index(3)])
    assert len(text_index.search("connections", candidates=[])) == 0


def test_text_index_persists_to_a_folder(tmp_path):
    first = TextIndex(tmp_path / "fts")
    first.add(pa.array([10, 11]), pa.array(["certificate expired", "cache stampede"]))
    del first
    reopened = TextIndex(tmp_path / "fts")
    assert len(reopened) == 2 and reopened.search("certificates").row_ids.tolist() == [10]


# --------------------------------------------------------------------------- fusion

def test_reciprocal_rank_fusion():
    vector = SearchResult(np.array([1, 2, 3]), np.array([0.9, 0.8, 0.7], np.float32))
    fused = reciprocal_rank_fusion([vector, [3, 1, 4]], k=60)
    expected = {1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 63}
    assert fused.row_ids.tolist() == [1, 3, 2, 4]
    assert fused.scores.tolist() == pytest.approx([expected[i] for i in [1, 3, 2, 4]])
    assert reciprocal_rank_fusion([[1, 2], [2, 1]]).row_ids.tolist() == [1, 2]  # tie -> lower id
    weighted = reciprocal_rank_fusion([[1, 2], [2, 1]], weights=[1.0, 2.0], limit=1)
    assert weighted.row_ids.tolist() == [2]
    assert len(reciprocal_rank_fusion([])) == 0


# --------------------------------------------------------------------------- chunking

MARKDOWN = """Intro paragraph before any heading.

# Guide title

## Symptoms
Orders fail.

```sh
# not a heading: a comment in code

echo still code
```

### Detail ###
Detail text.

## Fix
""" + " ".join(f"Sentence number {i} explains one more step of the fix." for i in range(40)) + "\n"


def test_markdown_chunks_follow_headings_and_keep_offsets():
    chunks = chunk_markdown(MARKDOWN, target_chunk_size=300, overlap_size=60)
    for chunk in chunks:
        assert chunk.text == MARKDOWN[chunk.start:chunk.end]
        assert 0 < len(chunk.text) <= 300
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].heading_path == () and chunks[0].text == "Intro paragraph before any heading."
    assert chunks[1].heading_path == ("Guide title", "Symptoms")
    assert "# not a heading" in chunks[1].text and "echo still code" in chunks[1].text  # code kept whole
    assert chunks[2].heading_path == ("Guide title", "Symptoms", "Detail")
    fix = [c for c in chunks if c.heading_path == ("Guide title", "Fix")]
    assert len(fix) > 3
    assert chunks[2].contextual_text() == "Guide title > Symptoms > Detail\n\nDetail text."


def test_overlap_repeats_the_end_of_the_previous_chunk():
    fix = [c for c in chunk_markdown(MARKDOWN, 300, 60) if c.heading_path[-1:] == ("Fix",)]
    for before, after in zip(fix, fix[1:]):
        assert after.start < before.end  # overlapping spans
        shared = MARKDOWN[after.start:before.end]
        assert 0 < len(shared) <= 60 and not shared.startswith(" ")
    no_overlap = [c for c in chunk_markdown(MARKDOWN, 300, 0) if c.heading_path[-1:] == ("Fix",)]
    assert all(b.start >= a.end for a, b in zip(no_overlap, no_overlap[1:]))
    # Sentences are not cut in the middle when a sentence end is available.
    assert all(c.text.rstrip().endswith(".") for c in no_overlap)


def test_plain_text_and_auto_detection():
    text = "First paragraph.\n\n# not markdown here\n\nSecond paragraph " + "word " * 300
    plain = chunk_text(text, target_chunk_size=200, overlap_size=20)
    assert all(c.heading_path == () and len(c.text) <= 200 for c in plain)
    assert plain[0].text.startswith("First paragraph.")
    assert any("# not markdown here" in c.text for c in plain)
    assert chunk_document(text)[0].heading_path == ()  # detected as markdown: intro has no heading
    assert chunk_document("no headings at all\n\njust text") == chunk_text("no headings at all\n\njust text")
    unbroken = chunk_text("x" * 1000, target_chunk_size=100, overlap_size=0)
    assert [len(c.text) for c in unbroken] == [100] * 10
    assert chunk_text("") == [] and chunk_markdown("# Only a heading\n") == []
    with pytest.raises(ValueError):
        chunk_text("abc", target_chunk_size=100, overlap_size=80)


# --------------------------------------------------------------------------- the demo guides

@pytest.fixture(scope="module")
def guide_chunks():
    rows = []
    for path in GUIDES:
        for chunk in chunk_markdown(path.read_text(encoding="utf-8"), target_chunk_size=600, overlap_size=80):
            rows.append((path.stem, chunk))
    return rows


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> TextEmbedder:
    # Same cache folder as test_inference_models.py, so one pytest session converts once.
    cache = tmp_path_factory.getbasetemp() / "inference-model-cache"
    return TextEmbedder.from_sentence_transformers(bundled_minilm_dir(), cache, threads=2)


def test_guides_exist():
    assert len(GUIDES) >= 5 and POOLER in [p.stem for p in GUIDES]


def test_vector_search_finds_the_connection_pooler_guide(guide_chunks, embedder):
    texts = pa.array([chunk.contextual_text() for _, chunk in guide_chunks])
    index = VectorIndex(embedder.embed(texts))
    result = index.search(embedder.embed_numpy([QUERY])[0], k=5)
    assert guide_chunks[result.row_ids[0]][0] == POOLER
    # Whole documents (truncated to 256 tokens) rank it first too.
    documents = VectorIndex(embedder.embed(pa.array([p.read_text() for p in GUIDES])))
    assert GUIDES[documents.search(embedder.embed_numpy([QUERY])[0], k=1).row_ids[0]].stem == POOLER


def test_text_and_hybrid_search_find_the_connection_pooler_guide(guide_chunks, embedder):
    index = TextIndex()
    index.add(np.arange(len(guide_chunks)), [chunk.contextual_text() for _, chunk in guide_chunks])
    keyword = index.search("pgbouncer transaction pooling", k=5)
    assert guide_chunks[keyword.row_ids[0]][0] == POOLER
    text_ranking = index.search(QUERY, k=10)
    vectors = VectorIndex(embedder.embed(pa.array([chunk.contextual_text() for _, chunk in guide_chunks])))
    vector_ranking = vectors.search(embedder.embed_numpy([QUERY])[0], k=10)
    fused = reciprocal_rank_fusion([vector_ranking, text_ranking])
    assert guide_chunks[fused.row_ids[0]][0] == POOLER
    # Restricting to other guides' chunks (a WHERE clause) leaves the pooler guide out entirely.
    others = [i for i, (name, _) in enumerate(guide_chunks) if name != POOLER]
    assert POOLER not in {guide_chunks[i][0] for i in index.search(QUERY, k=10, candidates=others).row_ids}
    assert POOLER not in {guide_chunks[i][0] for i in
                          vectors.search(embedder.embed_numpy([QUERY])[0], k=10, candidates=others).row_ids}
