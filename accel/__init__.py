"""Accelerated table stores (DuckDB, SQLite, Arrow), refresh and retention."""
