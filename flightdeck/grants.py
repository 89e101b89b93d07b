"""What a principal may read: datasets chosen by glob, per dataset the only columns it sees, and
the columns it sees masked (redacted or hashed).

A grant is a value (hashable): principals with equal grants share one engine session, whose
catalog holds only what the grant shows, so no door has a check to forget.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Mapping, Sequence

from federation.catalog import DEFAULT_SCHEMA

EVERYTHING = "*"


def qualified(name: str) -> str:
    """A dataset name with its schema (``orders`` is ``public.orders``)."""
    return name if "." in name else f"{DEFAULT_SCHEMA}.{name}"


@dataclass(frozen=True)
class Grant:
    datasets: tuple[str, ...] = (EVERYTHING,)             # globs over schema.table; a bare one means public
    columns: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (dataset, the only columns it shows)
    masks: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # (dataset, ((column, redact|hash), ...))
    audit: bool = False                                    # reads every principal's audit rows, not only its own

    @classmethod
    def of(cls, datasets: Sequence[str], columns: Mapping[str, Sequence[str]] | None = None,
           masks: Mapping[str, Mapping[str, str]] | None = None, audit: bool = False) -> "Grant":
        return cls(tuple(datasets), tuple(sorted((qualified(name), tuple(cols))
                                                 for name, cols in (columns or {}).items())),
                   tuple(sorted((qualified(name), tuple(sorted(kinds.items())))
                                for name, kinds in (masks or {}).items() if kinds)), audit)

    @property
    def is_full(self) -> bool:
        return self.datasets == (EVERYTHING,) and not self.columns and not self.masks

    def sees(self, dataset: str) -> bool:
        """Whether the dataset (its qualified name) exists for this grant."""
        return any(_matches(dataset, pattern) for pattern in self.datasets)

    def columns_of(self, dataset: str) -> tuple[str, ...] | None:
        """The only columns of a granted dataset this grant shows; None: all of them."""
        return dict(self.columns).get(dataset)

    def masks_of(self, dataset: str) -> dict[str, str] | None:
        """The masked columns of a granted dataset (column -> redact|hash); None: none."""
        kinds = dict(self.masks).get(dataset)
        return dict(kinds) if kinds else None


FULL = Grant()


def _matches(dataset: str, pattern: str) -> bool:
    """Whether a qualified dataset name matches a grant's glob. The schema and the table are
    matched apart, so no ``*`` reaches across the dot: ``metr*`` is ``public.metr*`` and does not
    grant ``metrics_internal.tokens``, and ``crm.*`` does not grant ``crm_archive.x``. A lone
    ``*`` is every dataset of every schema."""
    if pattern == EVERYTHING:
        return True
    schema, _, table = dataset.partition(".")
    pattern_schema, _, pattern_table = qualified(pattern).partition(".")
    return fnmatchcase(schema, pattern_schema) and fnmatchcase(table, pattern_table)
