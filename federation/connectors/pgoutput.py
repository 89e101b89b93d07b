"""PostgreSQL's pgoutput logical replication messages (protocol version 1), decoded.

Only what a change stream of whole rows needs: Begin, Commit, Relation, Insert, Update, Delete
and Truncate; Origin, Type and logical Message are read past. Column values arrive in their
text form (the walsender's output functions, in its session's TimeZone).
"""
from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass

PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
UNCHANGED = object()   # a TOASTed value an update did not change (and so did not send)


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    committed_at: dt.datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int          # where a stream resumes after this transaction
    committed_at: dt.datetime


@dataclass(frozen=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    columns: tuple[tuple[str, int], ...]   # (name, type oid), in the table's order


@dataclass(frozen=True)
class Insert:
    relation_id: int
    new: tuple


@dataclass(frozen=True)
class Update:
    relation_id: int
    old: tuple | None     # the old key ('K') or row ('O'); None when the key did not change
    new: tuple


@dataclass(frozen=True)
class Delete:
    relation_id: int
    old: tuple            # the key columns (others None), or the whole row with REPLICA IDENTITY FULL


@dataclass(frozen=True)
class Truncate:
    relation_ids: tuple[int, ...]


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.at = 0

    def take(self, fmt: str):
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def text(self) -> str:
        end = self.data.index(b"\0", self.at)
        value = self.data[self.at:end].decode()
        self.at = end + 1
        return value

    def tuple(self) -> tuple:
        values = []
        for _ in range(self.take("!h")):
            kind = self.take("!c")
            if kind == b"n":
                values.append(None)
            elif kind == b"u":
                values.append(UNCHANGED)
            else:  # b"t" (text); b"b" (binary) only comes when asked for, which we never do
                size = self.take("!i")
                values.append(self.data[self.at:self.at + size].decode())
                self.at += size
        return tuple(values)


def _time(microseconds: int) -> dt.datetime:
    return PG_EPOCH + dt.timedelta(microseconds=microseconds)


def decode(payload: bytes) -> Begin | Commit | Relation | Insert | Update | Delete | Truncate | None:
    """One pgoutput message; None for the kinds a row stream does not need."""
    reader = _Reader(payload)
    kind = reader.take("!c")
    if kind == b"B":
        final_lsn, committed, xid = reader.take("!qqi")
        return Begin(final_lsn, _time(committed), xid)
    if kind == b"C":
        _flags, commit_lsn, end_lsn, committed = reader.take("!bqqq")
        return Commit(commit_lsn, end_lsn, _time(committed))
    if kind == b"R":
        relation_id = reader.take("!I")
        namespace, name = reader.text(), reader.text()
        _identity, count = reader.take("!ch")
        columns = []
        for _ in range(count):
            reader.take("!b")  # column flags: whether it is part of the key, not needed
            column = reader.text()
            type_oid, _typmod = reader.take("!Ii")
            columns.append((column, type_oid))
        return Relation(relation_id, namespace, name, tuple(columns))
    if kind == b"I":
        relation_id, _new = reader.take("!Ic")
        return Insert(relation_id, reader.tuple())
    if kind == b"U":
        relation_id, marker = reader.take("!Ic")
        old = None
        if marker in (b"K", b"O"):
            old = reader.tuple()
            marker = reader.take("!c")
        return Update(relation_id, old, reader.tuple())
    if kind == b"D":
        relation_id, _marker = reader.take("!Ic")
        return Delete(relation_id, reader.tuple())
    if kind == b"T":
        count, _options = reader.take("!ib")
        return Truncate(tuple(reader.take("!I") for _ in range(count)))
    return None


def lsn_text(lsn: int) -> str:
    """An LSN as PostgreSQL writes it (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_number(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)
