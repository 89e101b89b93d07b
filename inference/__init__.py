"""Local models (ONNX Runtime embeddings, tabular models) and search indexes.

Modules, each importable on its own (nothing heavy is imported by this package):
- registry:  ModelRegistry, built from the config's `embeddings` / `models` lists
- embedder:  TextEmbedder.embed(strings) -> FixedSizeList<float32>
- bert_onnx: safetensors BERT encoder -> cached ONNX graph (+ int8 variant), no torch
- tabular:   TabularModel.predict(record batch) -> array
- search:    VectorIndex, TextIndex (tantivy BM25), reciprocal_rank_fusion
- ann:       ApproximateIndex, HNSW (faiss) for large vector columns
- query_cache: QueryVectorCache, a bounded LRU of query embeddings
- chunking:  chunk_markdown / chunk_text with heading paths
- reference: reference embeddings for accuracy tests
- errors:    ModelError, the one user-facing exception
"""
