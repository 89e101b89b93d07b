"""`file:` — Parquet, CSV, JSON/NDJSON and Markdown: one file, a folder or a glob.

Parquet is read by DataFusion's own listing table (Rust reader: projection,
filters with row-group pruning, limit). CSV and JSON go through a pyarrow
dataset that DataFusion scans with projection and filters pushed into pyarrow's
C++ scanner. Hive-style ``key=value`` folders become columns in both cases.
Markdown documents become one row each (path, title, content, bytes, modified).
"""
from __future__ import annotations

import datetime as dt
import glob as globbing
import json
import mmap
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from federation import expr as fx
from federation.arrow_expr import to_arrow
from federation.connectors.base import Connector, ConnectorError, first_rows
from federation.connectors.typing import MAX_JSON_DEPTH, json_nests_too_deep

FORMATS_BY_SUFFIX = {
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
    ".json": "json", ".ndjson": "json", ".jsonl": "json",
    ".md": "markdown", ".markdown": "markdown",
}
FORMATS = ("parquet", "csv", "json", "markdown")
GLOB_CHARACTERS = set("*?[")
MARKDOWN_SCHEMA = pa.schema([
    ("path", pa.string()), ("title", pa.string()), ("content", pa.string()),
    ("bytes", pa.int64()), ("modified", pa.timestamp("us", tz="UTC")),
])


class FileConnector(Connector):
    kind = "file"

    def __init__(self, params: dict[str, Any], base_dir: Path, location: str):
        super().__init__(params, base_dir)
        self.location = location
        self.path = self.resolve_path(location)
        self.is_glob = bool(GLOB_CHARACTERS & set(location))
        self.files = self._list_files()
        self.format = self._detect_format()
        self._dataset: ds.Dataset | None = None

    def describe(self) -> str:
        return f"file ({self.location})"

    def tables(self) -> list[str]:
        return [self.location]

    def _list_files(self) -> list[str]:
        if self.is_glob:
            files = sorted(f for f in globbing.glob(str(self.path), recursive=True) if Path(f).is_file())
        elif self.path.is_dir():
            files = sorted(str(p) for p in self.path.rglob("*")
                           if p.is_file() and not p.name.startswith((".", "_")))
        elif self.path.is_file():
            files = [str(self.path)]
        else:
            raise ConnectorError(f"file: {self.location} does not exist")
        if not files:
            raise ConnectorError(f"file: no files match {self.location}")
        return files

    def _detect_format(self) -> str:
        declared = self.params.get("file_format")
        if declared:
            if declared not in FORMATS:
                raise ConnectorError(
                    f"file: file_format must be one of {', '.join(FORMATS)}, not {declared!r}")
            return declared
        suffixes = {FORMATS_BY_SUFFIX.get(Path(f).suffix.lower()) for f in self.files}
        if len(suffixes) != 1 or None in suffixes:
            raise ConnectorError(
                f"file: cannot tell the format of {self.location}; set params.file_format")
        return suffixes.pop()

    # ---- the pyarrow dataset (schema, scan, CSV/JSON queries) ----

    def dataset(self) -> ds.Dataset:
        if self._dataset is None:
            self._dataset = self._open_dataset()
        return self._dataset

    def _open_dataset(self) -> ds.Dataset:
        root = self._partition_root()
        partitioning = "hive" if root is not None and self.format != "markdown" else None
        try:
            if self.format == "markdown":
                return ds.dataset(self._read_markdown())
            if self.format == "json":
                self._check_json_depth()
            if self.format == "json" and self._is_json_array():
                return ds.dataset(self._read_json_array())
            file_format = self._pyarrow_format()
            return ds.dataset(self.files, format=file_format, partitioning=partitioning,
                              partition_base_dir=root)
        except (pa.ArrowInvalid, OSError, ValueError) as error:
            raise ConnectorError(f"{self.describe()}: {error}") from None

    def _listed_again(self) -> ds.Dataset:
        """The dataset over the folder's (or glob's) files as they are now: a writer that adds
        files (a log shipper's new part, a metrics exporter's next minute) is seen at the next scan."""
        if self.path.is_dir() or self.is_glob:
            files = self._list_files()
            if files != self.files:
                self.files, self._dataset = files, None
        return self.dataset()

    def _partition_root(self) -> str | None:
        """The folder hive-style partition names are read below (a folder, or a glob's fixed part)."""
        if self.path.is_dir():
            return str(self.path)
        if self.is_glob:
            fixed = str(self.path)[:min(str(self.path).find(c) for c in GLOB_CHARACTERS
                                        if c in str(self.path))]
            return fixed if fixed.endswith("/") else str(Path(fixed).parent)
        return None

    def _pyarrow_format(self) -> ds.FileFormat | str:
        if self.format == "csv":
            delimiter = self.params.get("csv_delimiter") or (
                "\t" if self.files[0].endswith(".tsv") else ",")
            has_header = self.params.get("csv_has_header", True)
            read_options = pacsv.ReadOptions(autogenerate_column_names=not has_header)
            # An empty field is NULL in every column, text included; a quoted "" stays an empty text.
            convert = pacsv.ConvertOptions(strings_can_be_null=True, quoted_strings_can_be_null=False)
            return ds.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                    read_options=read_options, convert_options=convert)
        if self.format == "json":
            # pyarrow reads a file of one line that no newline ends as one row of NULLs, unless told
            # a line may go on past a block's end.
            return ds.JsonFileFormat(parse_options=pajson.ParseOptions(
                newlines_in_values=any(not _ends_with_newline(name) for name in self.files)))
        return "parquet"

    def _check_json_depth(self) -> None:
        """Refuse a JSON file nesting deeper than MAX_JSON_DEPTH: Arrow's reader would overflow
        its thread's stack on it and end the process."""
        for name in self.files:
            if os.path.getsize(name) == 0:
                continue  # nothing to map
            with open(name, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                if json_nests_too_deep(mapped):
                    raise ConnectorError(f"{self.describe()}: {Path(name).name} nests deeper than {MAX_JSON_DEPTH} levels")

    def _is_json_array(self) -> bool:
        with open(self.files[0], "rb") as handle:
            return handle.read(4096).lstrip()[:1] == b"["

    def _read_json_array(self) -> pa.Table:
        """A file holding one JSON array of records (what most HTTP APIs return)."""
        records = []
        for name in self.files:
            with open(name, "rb") as handle:
                records.extend(json.load(handle))
        lines = "\n".join(json.dumps(r) for r in records).encode()
        return pajson.read_json(pa.BufferReader(lines))

    def _read_markdown(self) -> pa.Table:
        root = self.path if self.path.is_dir() else Path(self.files[0]).parent
        rows = []
        for name in self.files:
            path = Path(name)
            text = path.read_text(encoding="utf-8")
            title = next((line.lstrip("#").strip() for line in text.splitlines()
                          if line.startswith("#")), path.stem)
            stat = path.stat()
            rows.append({"path": str(path.relative_to(root)), "title": title, "content": text,
                         "bytes": stat.st_size,
                         "modified": dt.datetime.fromtimestamp(stat.st_mtime, dt.timezone.utc)})
        return pa.Table.from_pylist(rows, schema=MARKDOWN_SCHEMA)

    def schema(self, table: str) -> pa.Schema:
        return self.dataset().schema

    def row_count(self, table: str) -> int | None:
        if self.format != "parquet":
            return None  # counting CSV or JSON means reading it all
        return self.dataset().count_rows()

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
             limit: int | None) -> pa.RecordBatchReader:
        arrow_filter = to_arrow(fx.And(tuple(filters))) if filters else None
        scanner = self._listed_again().scanner(columns=columns, filter=arrow_filter)
        self.stats.record_request(f"scan {self.location}")
        return first_rows(scanner.to_reader(), limit)

    # ---- DataFusion registration ----

    def register_native(self, ctx: Any, name: str, table: str) -> bool:
        if self.format != "parquet" or self.is_glob:
            # Scanned through the connector: DataFusion would hand a pyarrow dataset its filters
            # to apply with pyarrow's comparisons (NaN never greater), which lose rows.
            return False
        partition_columns = self._partition_columns()
        try:
            # register_parquet (unlike register_listing_table) honours the session's
            # Parquet options, e.g. plain strings instead of string views.
            ctx.register_parquet(
                name, str(self.path), table_partition_cols=partition_columns or None,
                file_extension="" if self.path.is_file() else ".parquet")
        except Exception as error:  # DataFusion raises a bare Exception
            raise ConnectorError(f"{self.describe()}: {error}") from None
        return True

    def _partition_columns(self) -> list[tuple[str, pa.DataType]]:
        if not self.path.is_dir():
            return []
        partitioning = self.dataset().partitioning
        if partitioning is None:
            return []
        return [(f.name, f.type if pa.types.is_integer(f.type) else pa.string())
                for f in partitioning.schema]


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
