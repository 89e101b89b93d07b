"""`git:path/to/repo/files` and `git:path/to/repo/commits` — a local git repository.

Read with git's own plumbing commands at HEAD (``ls-tree``, ``cat-file``, ``log``), with
optional locks disabled so that reading never writes to the repository. File contents are
read only when the ``content`` column is asked for; LIMIT on commits goes to ``git log -n``.
"""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from federation import expr as fx
from federation.connectors.base import Connector, ConnectorError

TABLES = ("files", "commits")
FILES_SCHEMA = pa.schema([
    ("path", pa.string()), ("size", pa.int64()), ("content", pa.string()), ("is_binary", pa.bool_()),
    ("blob_sha", pa.string()), ("last_commit", pa.string()),
    ("last_commit_at", pa.timestamp("s", tz="UTC")), ("last_author", pa.string()),
])
COMMITS_SCHEMA = pa.schema([
    ("sha", pa.string()), ("author_name", pa.string()), ("author_email", pa.string()),
    ("authored_at", pa.timestamp("s", tz="UTC")), ("committer_name", pa.string()),
    ("committed_at", pa.timestamp("s", tz="UTC")), ("subject", pa.string()), ("body", pa.string()),
    ("parents", pa.list_(pa.string())),
])
# A commit's fields, each ended by a NUL (with -z, git ends each commit with one more): names and
# messages may hold any other character, so nothing they hold can end a field or a commit early.
_COMMIT_FIELDS = ["%H", "%an", "%ae", "%aI", "%cn", "%cI", "%s", "%b", "%P"]
_COMMIT_FORMAT = "%x00".join(_COMMIT_FIELDS)
BATCH_ROWS = 4096


class GitConnector(Connector):
    kind = "git"

    def __init__(self, params: dict[str, Any], base_dir: Path, location: str):
        super().__init__(params, base_dir)
        repository, _, table = location.rstrip("/").rpartition("/")
        if table not in TABLES:
            raise ConnectorError(f"git: {location} must end with /files or /commits")
        self.table_kind = table
        self.repository = self.resolve_path(repository or ".")
        self.location = location
        if not (self.repository / ".git").exists() and not (self.repository / "HEAD").exists():
            raise ConnectorError(f"git: {self.repository} is not a git repository")

    def describe(self) -> str:
        return f"git ({self.repository.name})"

    def tables(self) -> list[str]:
        return [self.location]

    def schema(self, table: str) -> pa.Schema:
        return FILES_SCHEMA if self.table_kind == "files" else COMMITS_SCHEMA

    def _git(self, *args: str, stdin: bytes | None = None) -> bytes:
        environment = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0"}
        try:
            result = subprocess.run(["git", "-C", str(self.repository), *args], input=stdin,
                                    capture_output=True, env=environment, timeout=300, check=True)
        except subprocess.CalledProcessError as error:
            message = error.stderr.decode(errors="replace").strip().splitlines()
            raise ConnectorError(f"{self.describe()}: {message[-1] if message else 'git failed'}") from None
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ConnectorError(f"{self.describe()}: {error}") from None
        return result.stdout

    def row_count(self, table: str) -> int | None:
        if self.table_kind == "commits":
            return int(self._git("rev-list", "--count", "HEAD").strip() or 0)
        return self._git("ls-tree", "-r", "-z", "HEAD").count(b"\x00")

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
             limit: int | None) -> pa.RecordBatchReader:
        schema = self.schema(table)
        columns = schema.names if columns is None else (columns or schema.names[:1])
        self.stats.record_request(f"git {self.table_kind} of {self.repository.name}")
        if self.table_kind == "commits":
            rows = self._commits(None if filters else limit)  # limiting before filtering loses rows
        else:
            rows = self._files(columns)
        return self.rows_reader(rows, schema, columns, filters, limit, BATCH_ROWS)

    def _commits(self, limit: int | None) -> list[dict]:
        args = ["log", "-z", f"--format={_COMMIT_FORMAT}", "HEAD"]
        if limit is not None:
            args.insert(1, f"-n{int(limit)}")
        fields = self._git(*args).decode(errors="replace").split("\x00")
        width = len(_COMMIT_FIELDS)
        rows = []
        for start in range(0, len(fields) - width + 1, width):
            sha, name, email, authored, committer, committed, subject, body, parents = fields[start:start + width]
            rows.append({"sha": sha, "author_name": name, "author_email": email,
                         "authored_at": dt.datetime.fromisoformat(authored), "committer_name": committer,
                         "committed_at": dt.datetime.fromisoformat(committed), "subject": subject,
                         "body": body.strip(), "parents": parents.split() if parents else []})
        return rows

    def _files(self, columns: list[str]) -> list[dict]:
        rows = []
        for entry in self._git("ls-tree", "-r", "-l", "-z", "HEAD").split(b"\x00"):
            if not entry:
                continue
            meta, path = entry.split(b"\t", 1)
            _, kind, sha, size = meta.split()
            if kind != b"blob":
                continue  # submodules
            rows.append({"path": path.decode(errors="replace"), "size": int(size), "blob_sha": sha.decode()})
        if "content" in columns or "is_binary" in columns:
            for row, (content, binary) in zip(rows, self._contents([r["blob_sha"] for r in rows])):
                row["content"], row["is_binary"] = content, binary
        if {"last_commit", "last_commit_at", "last_author"} & set(columns):
            last = self._last_commits()
            for row in rows:
                row.update(last.get(row["path"], {}))
        return rows

    def _contents(self, shas: list[str]) -> Iterator[tuple[str | None, bool]]:
        output = self._git("cat-file", "--batch", stdin="".join(f"{s}\n" for s in shas).encode())
        position = 0
        for _ in shas:
            header_end = output.index(b"\n", position)
            size = int(output[position:header_end].split()[2])
            data = output[header_end + 1:header_end + 1 + size]
            position = header_end + 1 + size + 1
            binary = b"\x00" in data[:8000]
            yield (None if binary else data.decode(errors="replace")), binary

    def _last_commits(self) -> dict[str, dict]:
        """The newest commit touching each path (one `git log` over the history)."""
        # Each commit starts with a mark, and its author stands between two more: marks no path or
        # name can know beforehand, since either may hold any character but a NUL.
        nonce = uuid.uuid4().hex
        mark, around_author = f"\x1e{nonce}", f"\x1f{nonce}"
        log = self._git("log", f"--format={mark}%H %cI{around_author}%an{around_author}", "--name-only", "-z",
                        "HEAD").decode(errors="replace")
        last: dict[str, dict] = {}
        for record in log.split(mark):
            if not record.strip("\x00\n"):
                continue
            header, author, names = record.split(around_author)
            sha, committed = header.split(" ")
            for path in names.replace("\n", "").split("\x00"):
                if path and path not in last:
                    last[path] = {"last_commit": sha, "last_commit_at": dt.datetime.fromisoformat(committed),
                                  "last_author": author}
        return last
