"""Column masks: what a principal sees of a column in place of its values.

``redact`` shows NULL (the column keeps its type); ``hash`` shows a keyed HMAC-SHA256 of the
value as 64 hex characters (the column becomes text), stable for one key, so a join on a key
column hashed in two datasets still matches. Masks are applied to rows as they leave their
source, before any filter, join, sort or function of the query sees them: a query can only
ever compare, order or transform the masked value.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Mapping

import pyarrow as pa
import pyarrow.compute as pc

REDACT = "redact"
HASH = "hash"
KINDS = (REDACT, HASH)
HASHED_TYPE = pa.string()


@dataclass(frozen=True)
class ColumnMasks:
    """The masks of one dataset's columns, and the key hashes are made with."""
    kinds: tuple[tuple[str, str], ...]   # (column, redact|hash), sorted
    key: bytes = b""

    @classmethod
    def of(cls, kinds: Mapping[str, str] | None, key: bytes = b"") -> "ColumnMasks | None":
        """The masks named by ``kinds`` (None when there are none)."""
        if not kinds:
            return None
        if HASH in kinds.values() and not key:
            raise ValueError("hash masks need a key (runtime.auth.mask_key)")
        return cls(tuple(sorted(kinds.items())), key)

    @property
    def columns(self) -> set[str]:
        return {column for column, _ in self.kinds}

    def field(self, field: pa.Field) -> pa.Field:
        """A column's field as the mask shows it (a hashed column is text)."""
        kind = dict(self.kinds).get(field.name)
        if kind == HASH:
            return field.with_type(HASHED_TYPE).with_nullable(True)
        return field.with_nullable(True) if kind == REDACT else field

    def schema(self, schema: pa.Schema) -> pa.Schema:
        return pa.schema([self.field(f) for f in schema], metadata=schema.metadata)

    def apply(self, batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
        """The rows with every masked column they hold replaced by its masked values."""
        kinds = dict(self.kinds)
        for position, field in enumerate(batch.schema):
            kind = kinds.get(field.name)
            if kind is None:
                continue
            column = batch.column(position)
            masked = (pa.nulls(len(column), field.type) if kind == REDACT
                      else self._hashed(column))
            batch = batch.set_column(position, self.field(field), masked)
        return batch

    def _hashed(self, column: pa.Array | pa.ChunkedArray) -> pa.Array:
        """Each value's keyed hash, each distinct value hashed once; NULL stays NULL."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
                or pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.cast(column, pa.string())  # numbers, dates: their text, the same in every dataset
        encoded = column.dictionary_encode()
        digests = [None if value is None else hmac.new(
            self.key, value if isinstance(value, bytes) else value.encode(), hashlib.sha256).hexdigest()
            for value in encoded.dictionary.to_pylist()]
        return pa.DictionaryArray.from_arrays(encoded.indices, pa.array(digests, HASHED_TYPE)).cast(HASHED_TYPE)
