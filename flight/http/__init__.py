"""The HTTP door: SQL, search, datasets, refresh, OpenAI-compatible embeddings, health and
metrics on one Starlette app served by uvicorn."""
