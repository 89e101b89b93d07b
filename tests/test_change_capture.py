"""refresh_mode changes: the applier against a change source written here (a list of commits).

The source is real code on the same contract the database and bus connectors implement; these
tests pin what the applier guarantees whatever the source: the copy equals the source after
each batch, a file copy resumes at its committed position, resets are reported or re-snapshotted.
"""
from __future__ import annotations

import datetime as dt
import decimal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from accel.accelerator import AcceleratedSource, AccelerationError, Accelerator
from accel.spec import AccelerationSpec
from federation.changes import ChangeBatch, ChangeSource, PendingChanges, SourceReset
from federation.connectors.base import Connector
from federation.connectors.mysql_changes import statement_reset

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string()), ("amount", pa.float64())])


class TableOnly(Connector):
    """A table and no change stream."""

    kind = "tableonly"

    def tables(self) -> list[str]:
        return ["t"]

    def schema(self, table: str) -> pa.Schema:
        return SCHEMA

    def open_scan(self, table, columns, filters, limit) -> pa.RecordBatchReader:
        return SCHEMA.empty_table().to_reader()


class ListSource(TableOnly, ChangeSource):
    """A keyed table whose commits are fed by the test; positions count commits."""

    kind = "listsource"

    def __init__(self, rows: dict[int, tuple], key: tuple[str, ...] = ("id",)):
        super().__init__({}, Path("."))
        self.rows = dict(rows)
        self.key = key
        self.commits: list[ChangeBatch | Exception] = []
        self.arrived = threading.Condition()
        self.snapshots = 0
        self.resumed_from: list[dict] = []
        self.cleaned = False

    def open_scan(self, table, columns, filters, limit) -> pa.RecordBatchReader:
        return self.table().to_reader()

    def table(self) -> pa.Table:
        ordered = sorted(self.rows.values())
        return pa.table({name: [row[i] for row in ordered] for i, name in enumerate(SCHEMA.names)}, schema=SCHEMA)

    def change_key(self, table: str) -> tuple[str, ...]:
        return self.key

    def snapshot(self, table: str):
        self.snapshots += 1
        return self.table().to_reader(max_chunksize=7), {"commit": len(self.commits)}

    def commit(self, upserts: list[tuple] = (), deletes: list[int] = (), skipped: tuple[str, ...] = ()) -> None:
        for row in upserts:
            self.rows[row[0]] = row
        for key in deletes:
            self.rows.pop(key, None)
        self.push(ChangeBatch(
            upserts=pa.table({n: [r[i] for r in upserts] for i, n in enumerate(SCHEMA.names)}, schema=SCHEMA)
            if upserts else None,
            deletes=pa.table({"id": pa.array(list(deletes), pa.int64())}) if deletes else None,
            position={"commit": len(self.commits) + 1},
            committed_at=dt.datetime.now(dt.timezone.utc), skipped=skipped))

    def push(self, item: ChangeBatch | Exception) -> None:
        with self.arrived:
            self.commits.append(item)
            self.arrived.notify_all()

    def changes(self, table: str, since: dict, stop: threading.Event):
        self.resumed_from.append(since)
        done = since["commit"]
        while not stop.is_set():
            with self.arrived:
                self.arrived.wait_for(lambda: len(self.commits) > done, timeout=0.05)
                pending = self.commits[done:]
            for item in pending:
                done += 1
                if isinstance(item, Exception):  # once: the stream then goes on past it
                    self.commits[done - 1] = ChangeBatch(None, None, {"commit": done}, None)
                    raise item
                yield item

    def cleanup(self, table: str) -> None:
        self.cleaned = True


def _accelerator(tmp_path: Path, source: ListSource, engine: str = "duckdb", mode: str = "memory",
                 **spec) -> Accelerator:
    spec = AccelerationSpec(dataset="public.t", engine=engine, mode=mode, refresh_mode="changes",
                            retry_base_delay=0.05, **spec)
    accelerator = Accelerator([AcceleratedSource(spec, SCHEMA, source, "t", lambda c, t: None)],
                              tmp_path / "data", tmp_path)
    accelerator.start()
    return accelerator


def _copy(accelerator: Accelerator) -> pa.Table:
    return accelerator.refresher("public.t").store.read_all().sort_by("id")


def _until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _caught_up(accelerator: Accelerator, source: ListSource) -> None:
    refresher = accelerator.refresher("public.t")
    _until(lambda: refresher.status.position == f'{{"commit": {len(source.commits)}}}')


@pytest.mark.parametrize("engine", ["duckdb", "sqlite", "arrow"])
def test_the_copy_equals_the_source_after_each_batch(tmp_path, engine):
    source = ListSource({i: (i, f"n{i}", i * 1.5) for i in range(1, 21)})
    accelerator = _accelerator(tmp_path, source, engine)
    try:
        _caught_up(accelerator, source)
        assert _copy(accelerator).equals(source.table())
        source.commit(upserts=[(5, "five", 5.0), (100, "new", 1.0)], deletes=[7, 8])
        source.commit(upserts=[(7, "back", 7.0)], deletes=[100, 999])  # 999 was never there
        source.commit(deletes=[1])
        _caught_up(accelerator, source)
        assert _copy(accelerator).equals(source.table())
        status = accelerator.refresher("public.t").status
        assert (status.state, status.changes_applied, status.rows) == ("ready", 8, 18)
        assert status.lag_p50_ms is not None and status.lag_p99_ms >= status.lag_p50_ms
        assert source.snapshots == 1
    finally:
        accelerator.close()


@pytest.mark.parametrize("engine", ["duckdb", "sqlite"])
def test_a_file_copy_resumes_at_its_committed_position(tmp_path, engine):
    source = ListSource({i: (i, f"n{i}", 1.0) for i in range(1, 11)})
    accelerator = _accelerator(tmp_path, source, engine, "file")
    _caught_up(accelerator, source)
    source.commit(upserts=[(11, "eleven", 1.0)])
    _caught_up(accelerator, source)
    accelerator.close()
    source.commit(deletes=[2])           # committed while flightdeck was down
    source.commit(upserts=[(2, "again", 2.0)], deletes=[3])
    accelerator = _accelerator(tmp_path, source, engine, "file")
    try:
        _caught_up(accelerator, source)
        assert source.snapshots == 1, "the kept copy resumes; it is not re-read"
        assert source.resumed_from[-1] == {"commit": 1}
        assert _copy(accelerator).equals(source.table())
    finally:
        accelerator.close()


def test_a_source_reset_stops_the_copy_with_a_clear_error(tmp_path):
    source = ListSource({1: (1, "a", 1.0)})
    accelerator = _accelerator(tmp_path, source)
    try:
        _caught_up(accelerator, source)
        source.rows.clear()
        source.push(SourceReset("listsource: t was truncated"))
        refresher = accelerator.refresher("public.t")
        _until(lambda: refresher.status.state == "error")
        assert refresher.status.last_error == "listsource: t was truncated"
        assert _copy(accelerator).num_rows == 1, "the last good copy keeps serving"
        refresher.refresh()  # asked for: a new snapshot, then the stream goes on
        assert (refresher.status.state, refresher.status.last_error, source.snapshots) == ("ready", None, 2)
        source.commit(upserts=[(9, "z", 9.0)])
        _caught_up(accelerator, source)
        assert _copy(accelerator).equals(source.table())
    finally:
        accelerator.close()


def test_resnapshot_on_source_reset_when_configured(tmp_path):
    source = ListSource({1: (1, "a", 1.0), 2: (2, "b", 2.0)})
    accelerator = _accelerator(tmp_path, source, on_source_reset="resnapshot")
    try:
        _caught_up(accelerator, source)
        source.rows = {3: (3, "c", 3.0)}
        source.push(SourceReset("listsource: t was truncated"))
        _until(lambda: source.snapshots == 2)
        _until(lambda: _copy(accelerator).equals(source.table()))
        _until(lambda: accelerator.refresher("public.t").status.state == "ready")
        assert accelerator.refresher("public.t").status.last_error is None
    finally:
        accelerator.close()


def test_append_only_source_appends_and_counts_skipped_records(tmp_path):
    source = ListSource({}, key=())
    accelerator = _accelerator(tmp_path, source)
    try:
        _caught_up(accelerator, source)
        source.commit(upserts=[(1, "a", 1.0), (1, "a", 1.0)], skipped=("offset 3: not JSON",))
        source.commit(upserts=[(2, "b", 2.0)], skipped=("offset 5: not JSON", "offset 6: no field id"))
        _caught_up(accelerator, source)
        assert _copy(accelerator).column("id").to_pylist() == [1, 1, 2]
        status = accelerator.refresher("public.t").status
        assert (status.skipped, status.last_skip_reason) == (3, "offset 6: no field id")
    finally:
        accelerator.close()


def test_a_transient_failure_is_retried_from_the_committed_position(tmp_path):
    source = ListSource({1: (1, "a", 1.0)})
    accelerator = _accelerator(tmp_path, source)
    try:
        _caught_up(accelerator, source)
        source.commit(upserts=[(2, "b", 2.0)])
        source.push(ConnectionError("connection reset"))
        source.commit(upserts=[(3, "c", 3.0)])
        _until(lambda: len(source.resumed_from) >= 2)
        _caught_up(accelerator, source)
        assert source.resumed_from[1] == {"commit": 1}
        assert _copy(accelerator).equals(source.table())
        assert accelerator.refresher("public.t").status.failures == 1
    finally:
        accelerator.close()


def test_a_source_without_a_change_stream_is_refused(tmp_path):
    spec = AccelerationSpec(dataset="public.t", refresh_mode="changes")
    plain = TableOnly({}, tmp_path)
    with pytest.raises(AccelerationError, match="refresh_mode 'changes' needs a source that streams"):
        Accelerator([AcceleratedSource(spec, SCHEMA, plain, "t", lambda c, t: None)], tmp_path, tmp_path)


def test_pgoutput_messages_decode_into_collapsed_batches():
    import struct

    from federation.changes import PendingChanges
    from federation.connectors import pgoutput
    from federation.connectors.postgres_changes import value_parser

    def text(value: str | None) -> bytes:
        return b"n" if value is None else b"t" + struct.pack("!i", len(value.encode())) + value.encode()

    def row(*values: str | None) -> bytes:
        return struct.pack("!h", len(values)) + b"".join(text(v) for v in values)

    relation = (b"R" + struct.pack("!I", 7) + b"fd\0items\0" + b"d" + struct.pack("!h", 2)
                + b"\x01id\0" + struct.pack("!Ii", 23, -1) + b"\x00name\0" + struct.pack("!Ii", 25, -1))
    assert pgoutput.decode(relation) == pgoutput.Relation(7, "fd", "items", (("id", 23), ("name", 25)))
    begin = pgoutput.decode(b"B" + struct.pack("!qqi", 0x1_0000_0010, 1_000_000, 42))
    assert begin.final_lsn == 0x1_0000_0010 and begin.committed_at.isoformat() == "2000-01-01T00:00:01+00:00"
    commit = pgoutput.decode(b"C" + struct.pack("!bqqq", 0, 16, 24, 2_000_000))
    assert (commit.commit_lsn, commit.end_lsn) == (16, 24)
    insert = pgoutput.decode(b"I" + struct.pack("!I", 7) + b"N" + row("1", "a, \"b\""))
    update = pgoutput.decode(b"U" + struct.pack("!I", 7) + b"K" + row("1", None) + b"N" + row("2", None))
    delete = pgoutput.decode(b"D" + struct.pack("!I", 7) + b"K" + row("2", None))
    truncate = pgoutput.decode(b"T" + struct.pack("!ib", 1, 0) + struct.pack("!I", 7))
    assert insert == pgoutput.Insert(7, ("1", 'a, "b"'))
    assert update == pgoutput.Update(7, ("1", None), ("2", None))
    assert delete == pgoutput.Delete(7, ("2", None)) and truncate == pgoutput.Truncate((7,))
    assert pgoutput.lsn_number(pgoutput.lsn_text(0x16_B374D848)) == 0x16_B374D848 == pgoutput.lsn_number("16/B374D848")

    schema = pa.schema([("id", pa.int32()), ("name", pa.string())])
    pending = PendingChanges(schema, ("id",))
    pending.upsert({"id": 1, "name": "a"})
    pending.upsert({"id": 2, "name": "b"})
    pending.delete({"id": 1})
    pending.upsert({"id": 2, "name": "b2"})
    batch = pending.batch({"lsn": 24}, None)
    assert batch.upserts.to_pylist() == [{"id": 2, "name": "b2"}]
    assert batch.deletes.to_pylist() == [{"id": 1}]

    parse = value_parser(pa.list_(pa.string()))
    assert parse('{a,"b,c","d\\"e",NULL,"NULL"}') == ["a", "b,c", 'd"e', None, "NULL"]
    assert value_parser(pa.bool_())("t") is True and value_parser(pa.binary())("\\x0aff") == b"\n\xff"
    with pytest.raises(ValueError, match="not read from the change stream"):
        value_parser(pa.month_day_nano_interval())("1 day")


def test_changes_mode_refuses_keys_that_only_apply_to_re_reads(tmp_path):
    from flightdeck.config import ConfigError, parse_config

    dataset = {"from": "postgres:public.t", "name": "t",
               "acceleration": {"refresh_mode": "changes", "refresh_check_interval": "1m"}}
    with pytest.raises(ConfigError, match="refresh_check_interval does not apply to refresh_mode 'changes'"):
        parse_config({"datasets": [dataset]}, tmp_path, {})
    dataset["acceleration"] = {"refresh_mode": "changes", "refresh_on_source_reset": "sometimes"}
    with pytest.raises(ConfigError, match="refresh_on_source_reset"):
        parse_config({"datasets": [dataset]}, tmp_path, {})


def test_a_changed_row_the_columns_cannot_hold_is_skipped_not_retried_forever():
    """PostgreSQL's numeric NaN for a decimal column failed the whole batch, so the stream retried it
    every second while the source kept its log; the row is now skipped with its reason."""
    pending = PendingChanges(pa.schema([("id", pa.int64()), ("amount", pa.decimal128(38, 10))]), ("id",))
    pending.upsert({"id": 1, "amount": decimal.Decimal("1.5")})
    pending.upsert({"id": 2, "amount": decimal.Decimal("NaN")})
    pending.upsert({"id": 3, "amount": decimal.Decimal("3")})
    pending.delete({"id": 4})
    batch = pending.batch({"lsn": "0/1"}, None)
    assert batch.upserts.column("id").to_pylist() == [1, 3] and batch.deletes.column("id").to_pylist() == [4]
    assert len(batch.skipped) == 1 and "NaN" in batch.skipped[0]


class FailingStream(ListSource):
    """A source whose change stream fails the same way each time it is followed."""

    def changes(self, table: str, since: dict, stop: threading.Event):
        self.resumed_from.append(since)
        raise ConnectionError("the slot is gone")
        yield  # a generator, as a stream is


def test_a_stream_failing_again_at_once_waits_longer_each_time(tmp_path):
    """The wait between attempts was reset whenever the stream was opened again, so one failing
    at once was retried every 0.05 s here (every second by default) for as long as it failed."""
    source = FailingStream({1: (1, "a", 1.0)})
    accelerator = _accelerator(tmp_path, source)
    try:
        refresher = accelerator.refresher("public.t")
        _until(lambda: len(refresher.retry_delays) >= 5)
        assert refresher.retry_delays[4] > 0.3  # 0.05 s doubled four times, with jitter: 0.4 to 0.8
        assert _copy(accelerator).equals(source.table())  # the snapshot keeps serving
    finally:
        accelerator.close()


@pytest.mark.parametrize("statement,what", [
    ("/* migration */ ALTER TABLE items MODIFY v decimal(10,2)", "altered"),
    ("-- note\nALTER TABLE items DROP COLUMN v", "altered"),
    ("ALTER TABLE items_archive ADD COLUMN x int", None),
    ("ALTER TABLE other ADD COLUMN items int", None),
    ("TRUNCATE items_archive", None),
    ("TRUNCATE other.items", None),
    ("truncate `test`.`items`", "truncated"),
    ("ALTER TABLE items ADD INDEX ix (v), ENGINE = InnoDB, COMMENT = 'x, y'", None),
    ("ALTER TABLE items ADD INDEX ix (v), ADD COLUMN z int", "altered"),
    ("ALTER TABLE items ADD v2 int", "altered"),
    ("ALTER TABLE items ADD PRIMARY KEY (id)", "altered"),
    ("ALTER TABLE items RENAME TO items2", "altered"),
    ("ALTER TABLE items CONVERT TO CHARACTER SET utf8mb4", "altered"),
    ("ALTER TABLE items DEFAULT CHARSET utf8mb4", None),
    ("ALTER TABLE items RENAME INDEX a TO b", None),
    ("ALTER ONLINE TABLE items CHANGE v w int", "altered"),
    ("DROP TABLE IF EXISTS x, test.items", "dropped"),
    ("DROP TEMPORARY TABLE items", None),
    ("DROP DATABASE test", "dropped"),
    ("RENAME TABLE a TO items, b TO c", "renamed"),
    ("RENAME TABLE a TO b", None),
    ("CREATE OR REPLACE TABLE items (id int)", "replaced"),
    ("CREATE TABLE items2 (id int)", None),
])
def test_which_binlog_statements_stop_a_mysql_copy(statement, what):
    assert statement_reset(statement, "test", "test", "items") == what
