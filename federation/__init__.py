"""Federated, read-only SQL over every configured source, planned and run by DataFusion."""
import os

# DataFusion runs every query on one shared tokio pool, sized to the cores by default. An
# operator that never yields (a nested-loop join over an explosion of rows) keeps its
# threads until it ends, even after its deadline answered its client and its stream was
# dropped: with only as many threads as cores, every other query would wait for it. A pool
# a few times larger leaves threads to the others, and the operating system shares the cores
# among them. Read when the pool is made, at the first query, so set on import.
os.environ.setdefault("TOKIO_WORKER_THREADS", str(max(8, 4 * (os.cpu_count() or 2))))
