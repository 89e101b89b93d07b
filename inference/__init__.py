"""Local models (ONNX Runtime embeddings, tabular models) and search: see issue 5."""
