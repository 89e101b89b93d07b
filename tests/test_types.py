"""Types round-trip from each foundation backend to an ADBC client, NULLs everywhere."""
from __future__ import annotations

import datetime as dt
import decimal
import sqlite3

import adbc_driver_flightsql.dbapi as flightsql
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import serving

UTC = dt.timezone.utc

# One row of values and one row of NULLs, for every type family.
REFERENCE = pa.table({
    "i8": pa.array([-8, None], pa.int8()),
    "i16": pa.array([-16_000, None], pa.int16()),
    "i32": pa.array([-2_000_000_000, None], pa.int32()),
    "i64": pa.array([-9_000_000_000_000_000_000, None], pa.int64()),
    "u32": pa.array([4_000_000_000, None], pa.uint32()),
    "f32": pa.array([1.5, None], pa.float32()),
    "f64": pa.array([-2.25e300, None], pa.float64()),
    "dec_small": pa.array([decimal.Decimal("12345.6789"), None], pa.decimal128(18, 4)),
    "dec_large": pa.array([decimal.Decimal("1234567890123456789012345678.0123456789"), None],
                          pa.decimal128(38, 10)),
    "text": pa.array(["zürich ✈ 東京", None], pa.string()),
    "flag": pa.array([True, None], pa.bool_()),
    "day": pa.array([dt.date(2026, 11, 20), None], pa.date32()),
    "ts": pa.array([dt.datetime(2026, 11, 20, 14, 2, 3, 456789), None], pa.timestamp("us")),
    "ts_tz": pa.array([dt.datetime(2026, 11, 20, 14, 2, 3, 456789, tzinfo=UTC), None],
                      pa.timestamp("us", tz="UTC")),
    "clock": pa.array([dt.time(14, 2, 3, 456789), None], pa.time64("us")),
    "raw": pa.array([b"\x00\xffbinary", None], pa.binary()),
    "numbers": pa.array([[1, None, 3], None], pa.list_(pa.int64())),
    "words": pa.array([["a", None], None], pa.list_(pa.string())),
    "point": pa.array([{"x": 1, "label": "p"}, None],
                      pa.struct([("x", pa.int32()), ("label", pa.string())])),
})


def _normalize(table: pa.Table) -> list[dict]:
    rows = table.to_pylist()
    for row in rows:
        if isinstance(row.get("ts_tz"), dt.datetime):
            row["ts_tz"] = row["ts_tz"].astimezone(UTC)
    return rows


def _fetch(url: str, query: str) -> pa.Table:
    with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(query)
        return cursor.fetch_arrow_table()


@pytest.fixture(scope="module")
def typed_sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("types")
    pq.write_table(REFERENCE, folder / "typed.parquet")
    with duckdb.connect(str(folder / "typed.duckdb")) as con:
        con.register("reference", REFERENCE)
        con.execute("CREATE TABLE typed AS SELECT * FROM reference")
    with sqlite3.connect(folder / "typed.sqlite") as con:
        con.execute("CREATE TABLE typed (id INTEGER PRIMARY KEY, amount DECIMAL(10,2), name TEXT, "
                    "ratio REAL, flag BOOLEAN, day DATE, at TIMESTAMP, raw BLOB)")
        con.execute("INSERT INTO typed VALUES (1, 12.5, 'zürich', 0.25, 1, '2026-11-20', "
                    "'2026-11-20 14:02:03.456789', x'00ff')")
        con.execute("INSERT INTO typed (id) VALUES (2)")
    config = {"datasets": [
        {"from": "file:typed.parquet", "name": "from_parquet"},
        {"from": "duckdb:typed", "name": "from_duckdb", "params": {"duckdb_open": "typed.duckdb"}},
        {"from": "sqlite:typed", "name": "from_sqlite", "params": {"sqlite_file": "typed.sqlite"}},
    ]}
    with serving(config, folder) as runtime:
        yield runtime.flight_url


@pytest.mark.parametrize("dataset", ["from_parquet", "from_duckdb"])
def test_every_type_round_trips(typed_sources, dataset):
    result = _fetch(typed_sources, f"SELECT * FROM {dataset}")
    assert result.num_rows == 2
    for field in REFERENCE.schema:
        got = result.schema.field(field.name).type
        if pa.types.is_timestamp(field.type) and field.type.tz:
            assert pa.types.is_timestamp(got) and got.tz in ("UTC", "Etc/UTC"), field.name
        elif pa.types.is_list(field.type):  # backends name the child field differently
            assert pa.types.is_list(got) and got.value_type == field.type.value_type, field.name
        else:
            assert got == field.type, field.name
    assert _normalize(result) == _normalize(REFERENCE)
    assert all(v is None for v in result.slice(1).to_pylist()[0].values())


def test_sqlite_declared_types_map_to_arrow(typed_sources):
    result = _fetch(typed_sources, "SELECT * FROM from_sqlite ORDER BY id")
    assert result.schema.types == [pa.int64(), pa.decimal128(10, 2), pa.string(), pa.float64(),
                                   pa.bool_(), pa.date32(), pa.timestamp("us"), pa.binary()]
    assert result.to_pylist() == [
        {"id": 1, "amount": decimal.Decimal("12.50"), "name": "zürich", "ratio": 0.25, "flag": True,
         "day": dt.date(2026, 11, 20), "at": dt.datetime(2026, 11, 20, 14, 2, 3, 456789),
         "raw": b"\x00\xff"},
        {"id": 2, "amount": None, "name": None, "ratio": None, "flag": None, "day": None,
         "at": None, "raw": None},
    ]


def test_parameters_of_several_types(typed_sources):
    with flightsql.connect(typed_sources, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT i64 FROM from_duckdb WHERE text = ? AND day = ? AND flag = ?",
                       ("zürich ✈ 東京", dt.date(2026, 11, 20), True))
        assert cursor.fetchall() == [(-9_000_000_000_000_000_000,)]
        cursor.execute("SELECT count(*) FROM from_parquet WHERE ts < ?", (dt.datetime(2030, 1, 1),))
        assert cursor.fetchall() == [(1,)]
