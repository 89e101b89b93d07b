"""New statements: what flightdeck adds to DataFusion's own planning and running of a statement
it has not seen before (an agent writing a new question each time: no plan to reuse).

    python -m bench.planning [--rows 200000] [--repeats 15]

Both sides read the same Parquet files, in one process: DataFusion alone (``SessionContext.sql``
then ``collect``), and flightdeck's Service (the read-only gate, placeholder and search rewriting,
DataFusion's plan, the pushdown decisions, the audit), each statement made new at every run (a
trailing comment) so that no plan is reused. Statements: a small aggregate, a join, a window,
and IN lists of 10,000 and 100,000 values (0.6 MB of SQL). Writes bench/results/planning.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datafusion import SessionContext

from bench.common import RESULTS, progress

STATEMENTS = {
    "aggregate": "SELECT status, count(*) AS n, sum(amount) AS total FROM orders GROUP BY status ORDER BY status",
    "join": "SELECT c.tier, count(*) AS n, sum(o.amount) AS total FROM orders o JOIN customers c "
            "ON c.customer_id = o.customer_id WHERE o.status = 'failed' GROUP BY c.tier ORDER BY c.tier",
    "window": "SELECT customer_id, amount, rank() OVER (PARTITION BY customer_id ORDER BY amount DESC) AS r "
              "FROM orders WHERE customer_id < 20 ORDER BY customer_id, r LIMIT 50",
    "IN list, 10,000 values": "SELECT count(*) AS n FROM orders WHERE order_id IN ({values})".replace(
        "{values}", ", ".join(str(i * 7) for i in range(10_000))),
    "IN list, 100,000 values": "SELECT count(*) AS n FROM orders WHERE order_id IN ({values})".replace(
        "{values}", ", ".join(str(i * 7) for i in range(100_000))),
}


def write_data(folder: Path, rows: int) -> None:
    rng = np.random.default_rng(7)
    pq.write_table(pa.table({
        "order_id": np.arange(rows, dtype=np.int64),
        "customer_id": rng.integers(0, 5_000, rows),
        "amount": np.round(rng.random(rows) * 500, 2),
        "status": pa.array(np.array(["completed", "failed", "refunded"])[rng.integers(0, 3, rows)]),
    }), folder / "orders.parquet")
    pq.write_table(pa.table({
        "customer_id": np.arange(5_000, dtype=np.int64),
        "tier": pa.array(np.array(["free", "pro", "enterprise"])[np.arange(5_000) % 3]),
    }), folder / "customers.parquet")


def _same(ours: pa.Table, theirs: pa.Table) -> bool:
    """The same answer, sums of floats to within their rounding (added in another order)."""
    if ours.column_names != theirs.column_names or ours.num_rows != theirs.num_rows:
        return False
    return all(np.allclose(a.to_numpy(), b.to_numpy()) if pa.types.is_floating(a.type) else a.to_pylist() == b.to_pylist()
               for a, b in zip(ours.columns, theirs.columns))


def timed(run, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` runs of ``run(n)`` (``n`` makes the statement new)."""
    run(-1)  # warm-up
    times = []
    for n in range(repeats):
        started = time.perf_counter()
        run(n)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    from flight.cli import Serving
    from flightdeck.auth import OPERATOR
    from flightdeck.config import parse_config

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_data(folder, args.rows)
        alone = SessionContext()
        for table in ("orders", "customers"):
            alone.register_parquet(table, str(folder / f"{table}.parquet"))
        config = {"datasets": [{"from": "file:orders.parquet", "name": "orders"},
                               {"from": "file:customers.parquet", "name": "customers"}],
                  "runtime": {"limits": {"max_sql_length": 1_000_000}, "flight": {"port": 0}, "http": {"port": 0}}}
        serving = Serving(parse_config(config, folder, {}))
        results = {}
        try:
            for name, sql in STATEMENTS.items():
                expected = alone.sql(sql).to_arrow_table()
                answered = serving.service.query(OPERATOR, sql).read_all()
                assert _same(answered, expected), name
                baseline = timed(lambda n: alone.sql(f"{sql} -- {n}").collect(), args.repeats)
                ours = timed(lambda n: serving.service.query(OPERATOR, f"{sql} -- {n}").read_all(), args.repeats)
                row = {"sql_characters": len(sql), "datafusion_p50_ms": round(statistics.median(baseline), 2),
                       "flightdeck_p50_ms": round(statistics.median(ours), 2)}
                row["ratio"] = round(row["flightdeck_p50_ms"] / row["datafusion_p50_ms"], 2)
                results[name] = row
                progress(f"{name}: DataFusion alone {row['datafusion_p50_ms']} ms, flightdeck "
                         f"{row['flightdeck_p50_ms']} ms ({row['ratio']}x), {len(sql):,} characters")
        finally:
            serving.close()
    report = {"machine": {"python": sys.version.split()[0], "platform": platform.platform()},
              "rows": args.rows, "repeats": args.repeats, "statements": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "planning.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
