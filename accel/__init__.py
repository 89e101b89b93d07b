"""Accelerated table stores (DuckDB, SQLite, Arrow), refresh and retention: see issue 4."""
