"""The attack cases of tests/test_attacks.py, as data.

A case is (name, backend, category, sql, params, expect). ``sql`` may hold ``{t}`` (the
backend's dataset), ``{canary}`` (a host file whose content must never come back) and
``{target}`` (a host path that must never be created). ``expect`` is REFUSED (the client gets
an error) or ANY (an error, or an answer that changed nothing). Parameterised reads have
``expect`` = the count they must answer: the bound value compares as a value, nothing else.
"""
from __future__ import annotations

from typing import Any, NamedTuple

REFUSED, ANY = "refused", "any"

# Every backend holds exactly these rows in a table t(id, name).
ROWS = [(1, "alice"), (2, "bob"), (3, "x'; DROP TABLE t; --"), (4, "back\\slash'"), (5, "$$dollar$$"),
        (6, "E'\\x27"), (7, "/*!50000 DROP TABLE t */")]

BACKENDS = ["parquet", "csv", "duckdb", "sqlite", "postgres", "mariadb", "accel_duckdb", "accel_sqlite"]
PWNED = "fd_atk_pwned"


class Case(NamedTuple):
    name: str
    backend: str
    category: str
    sql: str
    params: list[Any] | None
    expect: Any


def _every(category: str, name: str, sql: str, params=None, expect=REFUSED) -> list[Case]:
    return [Case(name, backend, category, sql, params, expect) for backend in BACKENDS]


def _on(backend: str, category: str, entries: list[tuple]) -> list[Case]:
    return [Case(name, backend, category, sql, None, expect) for name, sql, expect in entries]


# ---- on every backend -------------------------------------------------------------------

WRITES = [
    ("insert", "INSERT INTO {t} VALUES (99, 'pwned')"),
    ("insert select", "INSERT INTO {t} SELECT * FROM {t}"),
    ("update", "UPDATE {t} SET name = 'pwned'"),
    ("delete", "DELETE FROM {t} WHERE id = 1"),
    ("merge", "MERGE INTO {t} USING {t} s ON s.id = {t}.id WHEN MATCHED THEN DELETE"),
    ("create table as", f"CREATE TABLE {PWNED} AS SELECT * FROM {{t}}"),
    ("drop", "DROP TABLE {t}"),
    ("truncate", "TRUNCATE {t}"),
    ("alter", "ALTER TABLE {t} ADD COLUMN pwned INT"),
    ("copy to a host file", "COPY {t} TO '{target}'"),
    ("copy query to a host file", "COPY (SELECT * FROM {t}) TO '{target}' (FORMAT csv)"),
    ("select into", f"SELECT * INTO {PWNED} FROM {{t}}"),
    ("data-modifying cte", "WITH x AS (DELETE FROM {t} RETURNING *) SELECT * FROM x"),
    ("explain analyze of a write", "EXPLAIN ANALYZE DELETE FROM {t}"),
]

LOCKING_READS = [
    ("for update", "SELECT * FROM {t} FOR UPDATE"),
    ("for share", "SELECT * FROM {t} FOR SHARE"),
    ("for no key update", "SELECT id FROM {t} FOR NO KEY UPDATE"),
    ("for key share nowait", "SELECT id FROM {t} FOR KEY SHARE NOWAIT"),
    ("lock in share mode", "SELECT id FROM {t} LOCK IN SHARE MODE"),
]

TRICKS = [
    ("semicolon then drop", "SELECT 1 FROM {t}; DROP TABLE {t}", REFUSED),
    ("semicolon in a line comment", "SELECT id FROM {t} -- ; DROP TABLE {t}\n", ANY),
    ("statement after a block comment", "SELECT id FROM {t} /* ; */; DELETE FROM {t}", REFUSED),
    ("semicolon inside a string", "SELECT ';DROP TABLE x' AS s, id FROM {t}", ANY),
    ("nested comments", "SELECT id FROM {t} /* a /* b */ ; DELETE FROM {t} */", ANY),
    ("unclosed nested comment", "SELECT id FROM {t} /* /* */ ; DELETE FROM {t}", REFUSED),
    ("mysql executable comment", "SELECT id FROM {t} /*!50000 ; DROP TABLE {t} */", ANY),
    ("mysql executable comment union", "SELECT id FROM {t} /*!50000 UNION SELECT 1 INTO OUTFILE '{target}' */",
     ANY),
    ("optimizer hint comment", "SELECT /*+ SET_VAR(sql_mode='') */ id FROM {t}", ANY),
    ("fullwidth semicolon", "SELECT id FROM {t}\uff1b DROP TABLE {t}", REFUSED),
    ("greek question mark", "SELECT id FROM {t}\u037e DROP TABLE {t}", REFUSED),
    ("cyrillic look-alike DELETE", "D\u0415LETE FROM {t}", REFUSED),
    ("fullwidth SELECT keyword", "\uff33\uff25\uff2c\uff25\uff23\uff34 1; DROP TABLE {t}", REFUSED),
    # ADBC sends the text as a C string: the server gets what comes before the NUL (the raw
    # Flight client of test_attacks.py sends the whole of it, which the gate refuses)
    ("NUL byte before a second statement", "SELECT id FROM {t}\x00; DROP TABLE {t}", ANY),
    ("NUL byte inside a statement", "SELECT id FROM {t} WHERE name = 'a\x00'; DELETE FROM {t}", REFUSED),
    ("zero-width space before DROP", "SELECT 1;\u200bDROP TABLE {t}", REFUSED),
    ("dollar quoted body", "SELECT $$; DROP TABLE {t}; $$ AS s FROM {t}", ANY),
    ("E-string escape", "SELECT E'\\'; DROP TABLE {t}; --' AS s FROM {t}", ANY),
    ("backslash quote", "SELECT 'a\\'; DROP TABLE {t}; --' AS s FROM {t}", ANY),
    ("begin then write", "BEGIN; DELETE FROM {t}; COMMIT", REFUSED),
    ("commit then write", "COMMIT; DELETE FROM {t}", REFUSED),
    ("with then insert", "WITH x AS (SELECT 1) INSERT INTO {t} SELECT 99, 'x' FROM x", REFUSED),
    ("parenthesised write", "(DELETE FROM {t})", REFUSED),
    ("explain of a write", "EXPLAIN DELETE FROM {t}", REFUSED),
    ("values then write", "VALUES (1); DELETE FROM {t}", REFUSED),
]

PARAMETERS = [  # (name, value): bound to "name = ?" and answered as a value
    ("quote break", "x'; DROP TABLE t; --"),
    ("backslash quote break", "back\\slash'"),
    ("dollar quotes", "$$dollar$$"),
    ("E-string", "E'\\x27"),
    ("or 1=1", "' OR '1'='1"),
    ("union", "' UNION SELECT name FROM pg_authid --"),
    ("mysql comment", "/*!50000 DROP TABLE t */"),
    ("into outfile", "x' INTO OUTFILE '/tmp/fd_atk_param"),
    ("nul byte", "a\x00'; DROP TABLE t; --"),
    ("backslash at the end", "\\"),
]

IDENTIFIERS = [
    ("double quote in a name", 'SELECT * FROM "{t}""; DROP TABLE {t}; --"'),
    ("backtick name", "SELECT * FROM `{t}`; DROP TABLE {t}"),
    ("bracket name", "SELECT * FROM [{t}]; DROP TABLE {t}"),
    ("quoted column with a quote", 'SELECT "id""; DELETE FROM {t}; --" FROM {t}'),
    ("quoted path as a table", "SELECT * FROM '{canary}'"),
    ("quoted relative file as a table", "SELECT * FROM 'rows.csv'"),
]


def _common() -> list[Case]:
    cases: list[Case] = []
    for name, sql in WRITES:
        cases += _every("write", name, sql)
    for name, sql in LOCKING_READS:
        cases += _every("locking read", name, sql)
    for name, sql, expect in TRICKS:
        cases += _every("comments and multi-statement", name, sql, expect=expect)
    for name, value in PARAMETERS:
        expected = sum(1 for _, held in ROWS if held == value)
        cases += _every("bound parameters", name, "SELECT count(*) AS n FROM {t} WHERE name = ?", [value],
                        expect=expected)
    # PostgreSQL text cannot hold a NUL: it refuses the value rather than comparing it
    cases = [c._replace(expect=ANY) if c.backend == "postgres" and c.name == "nul byte" else c for c in cases]
    for name, sql in IDENTIFIERS:
        cases += _every("identifiers", name, sql)
    return cases


# ---- per backend: its own file, network, lock and sequence functions ---------------------

POSTGRES = _on("postgres", "backend functions", [
    ("pg_read_file", "SELECT pg_read_file('{canary}') FROM {t}", REFUSED),
    ("pg_read_binary_file", "SELECT pg_read_binary_file('{canary}')", REFUSED),
    ("pg_ls_dir", "SELECT * FROM pg_ls_dir('/tmp')", REFUSED),
    ("pg_stat_file", "SELECT pg_stat_file('{canary}')", REFUSED),
    ("lo_import", "SELECT lo_import('{canary}')", REFUSED),
    ("lo_export", "SELECT lo_export(1, '{target}')", REFUSED),
    ("copy to program", "COPY {t} TO PROGRAM 'touch {target}'", REFUSED),
    ("copy from program", "COPY {t} FROM PROGRAM 'cat {canary}'", REFUSED),
    ("dblink", "SELECT * FROM dblink('host=127.0.0.1', 'DELETE FROM fd_atk.t') AS x(a int)", REFUSED),
    ("dblink_exec", "SELECT dblink_exec('host=127.0.0.1', 'DROP TABLE fd_atk.t')", REFUSED),
    ("nextval", "SELECT nextval('fd_atk.seq') FROM {t}", REFUSED),
    ("setval", "SELECT setval('fd_atk.seq', 1000)", REFUSED),
    ("pg_advisory_lock", "SELECT pg_advisory_lock(4242) FROM {t}", REFUSED),
    ("pg_advisory_xact_lock", "SELECT pg_advisory_xact_lock(4242)", REFUSED),
    ("pg_try_advisory_lock_shared", "SELECT pg_try_advisory_lock_shared(4242)", REFUSED),
    ("set_config read-write", "SELECT set_config('default_transaction_read_only', 'off', false)", REFUSED),
    ("pg_sleep", "SELECT pg_sleep(30) FROM {t}", REFUSED),
    ("pg_terminate_backend", "SELECT pg_terminate_backend(pg_backend_pid())", REFUSED),
    ("set session read write", "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", REFUSED),
    ("set transaction read write", "SET TRANSACTION READ WRITE", REFUSED),
    ("lock table", "LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE", REFUSED),
    ("do block", "DO $$ BEGIN DELETE FROM fd_atk.t; END $$", REFUSED),
    ("call", "CALL pg_catalog.pg_reload_conf()", REFUSED),
    ("catalog read", "SELECT rolpassword FROM pg_authid", REFUSED),
    ("backend catalog joined", "SELECT t.id FROM {t} t JOIN pg_catalog.pg_settings s ON s.name = t.name", REFUSED),
    ("current_setting", "SELECT id FROM {t} WHERE current_setting('data_directory') <> ''", REFUSED),
    ("for update of a join", "SELECT a.id FROM {t} a JOIN {t} b ON a.id = b.id FOR UPDATE OF a", REFUSED),
    ("for update skip locked", "SELECT id FROM {t} WHERE id = 1 FOR UPDATE SKIP LOCKED", REFUSED),
])

MARIADB = _on("mariadb", "backend functions", [
    ("load_file", "SELECT LOAD_FILE('{canary}') FROM {t}", REFUSED),
    ("into outfile", "SELECT id FROM {t} INTO OUTFILE '{target}'", REFUSED),
    ("into dumpfile", "SELECT name FROM {t} LIMIT 1 INTO DUMPFILE '{target}'", REFUSED),
    ("into variable", "SELECT id FROM {t} LIMIT 1 INTO @pwned", REFUSED),
    ("load data infile", "LOAD DATA INFILE '{canary}' INTO TABLE {t}", REFUSED),
    ("load data local infile", "LOAD DATA LOCAL INFILE '{canary}' INTO TABLE {t}", REFUSED),
    ("get_lock", "SELECT GET_LOCK('fd_atk', 10) FROM {t}", REFUSED),
    ("sleep", "SELECT SLEEP(30) FROM {t}", REFUSED),
    ("benchmark", "SELECT BENCHMARK(100000000, md5('x'))", REFUSED),
    ("executable comment write", "/*!50000 DELETE FROM {t} */", REFUSED),
    ("executable comment into outfile", "SELECT id FROM {t} /*!50000 INTO OUTFILE '{target}' */", ANY),
    ("set session read write", "SET SESSION TRANSACTION READ WRITE", REFUSED),
    ("handler", "HANDLER {t} OPEN", REFUSED),
    ("replace", "REPLACE INTO {t} VALUES (1, 'pwned')", REFUSED),
    ("insert ignore", "INSERT IGNORE INTO {t} VALUES (1, 'pwned')", REFUSED),
    ("rename table", f"RENAME TABLE {{t}} TO {PWNED}", REFUSED),
    ("mysql schema read", "SELECT authentication_string FROM mysql.user", REFUSED),
    ("backtick breakout", "SELECT `id`; DELETE FROM {t}; -- ` FROM {t}", REFUSED),
    ("hash comment", "SELECT id FROM {t} # ; DELETE FROM {t}\n", ANY),
])

DUCKDB_LIKE = [
    ("read_csv on a host path", "SELECT * FROM read_csv('{canary}')", REFUSED),
    ("read_csv_auto", "SELECT * FROM read_csv_auto('{canary}')", REFUSED),
    ("read_parquet", "SELECT * FROM read_parquet('{canary}')", REFUSED),
    ("read_text", "SELECT * FROM read_text('{canary}')", REFUSED),
    ("read_blob", "SELECT * FROM read_blob('{canary}')", REFUSED),
    ("read_json", "SELECT * FROM read_json('{canary}')", REFUSED),
    ("glob", "SELECT * FROM glob('/tmp/*')", REFUSED),
    ("httpfs url", "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')", REFUSED),
    ("s3 url", "SELECT * FROM 's3://bucket/x.parquet'", REFUSED),
    ("attach", "ATTACH '{target}' AS pwned", REFUSED),
    ("detach", "DETACH accel_file", REFUSED),
    ("install", "INSTALL httpfs", REFUSED),
    ("load", "LOAD httpfs", REFUSED),
    ("copy to", "COPY {t} TO '{target}' (FORMAT parquet)", REFUSED),
    ("copy from", "COPY {t} FROM '{canary}'", REFUSED),
    ("export database", "EXPORT DATABASE '{target}'", REFUSED),
    ("import database", "IMPORT DATABASE '{canary}'", REFUSED),
    ("pragma", "PRAGMA enable_external_access", REFUSED),
    ("set external access", "SET enable_external_access = true", REFUSED),
    ("reset lock", "RESET lock_configuration", REFUSED),
    ("create macro", f"CREATE MACRO {PWNED}() AS 1", REFUSED),
    ("create secret", "CREATE SECRET (TYPE s3, KEY_ID 'x', SECRET 'y')", REFUSED),
    ("checkpoint", "CHECKPOINT", REFUSED),
    ("duckdb_settings", "SELECT * FROM duckdb_settings()", REFUSED),
    ("nextval", f"SELECT nextval('{PWNED}_seq')", REFUSED),
    ("replacement scan of the copy file", "SELECT * FROM 'data/accel.duckdb'", REFUSED),
]

SQLITE_LIKE = [
    ("attach", "ATTACH DATABASE '{target}' AS pwned", REFUSED),
    ("load_extension", "SELECT load_extension('/tmp/fd_atk_ext')", REFUSED),
    ("vacuum into", "VACUUM INTO '{target}'", REFUSED),
    ("readfile", "SELECT readfile('{canary}')", REFUSED),
    ("writefile", "SELECT writefile('{target}', 'x')", REFUSED),
    ("fts3_tokenizer", "SELECT fts3_tokenizer('simple')", REFUSED),
    ("pragma writable_schema", "PRAGMA writable_schema = 1", REFUSED),
    ("pragma journal_mode", "PRAGMA journal_mode = DELETE", REFUSED),
    ("sqlite_master", "SELECT sql FROM sqlite_master", REFUSED),
    ("create trigger", "CREATE TRIGGER pwned AFTER INSERT ON {t} BEGIN SELECT 1; END", REFUSED),
    ("create virtual table", "CREATE VIRTUAL TABLE pwned USING fts5(x)", REFUSED),
    ("reindex", "REINDEX", REFUSED),
    ("analyze", "ANALYZE", REFUSED),
    ("insert or replace", "INSERT OR REPLACE INTO {t} VALUES (1, 'pwned')", REFUSED),
    ("upsert", "INSERT INTO {t} VALUES (1, 'x') ON CONFLICT DO UPDATE SET name = 'pwned'", REFUSED),
]

FILES = [
    ("create external table on a host file",
     "CREATE EXTERNAL TABLE pwned STORED AS CSV LOCATION '{canary}'", REFUSED),
    ("create external table over the dataset's folder",
     "CREATE EXTERNAL TABLE pwned STORED AS PARQUET LOCATION '.'", REFUSED),
    ("copy the dataset out", "COPY {t} TO '{target}' STORED AS CSV", REFUSED),
    ("copy a query out", "COPY (SELECT * FROM {t}) TO '{target}.parquet'", REFUSED),
    ("insert into the file", "INSERT INTO {t} VALUES (99, 'pwned')", REFUSED),
    ("path as a table", "SELECT * FROM '{canary}'", REFUSED),
    ("file url as a table", "SELECT * FROM 'file://{canary}'", REFUSED),
    ("http url as a table", "SELECT * FROM 'http://127.0.0.1:9/x.parquet'", REFUSED),
    ("parquet_metadata", "SELECT * FROM parquet_metadata('{canary}')", REFUSED),
    ("set a session option", "SET datafusion.catalog.information_schema = false", REFUSED),
    ("create view", f"CREATE VIEW {PWNED} AS SELECT * FROM {{t}}", REFUSED),
    ("create function", f"CREATE FUNCTION {PWNED}(x INT) RETURNS INT RETURN x", REFUSED),
    ("drop the catalog schema", "DROP SCHEMA public CASCADE", REFUSED),
    ("prepare a write", "PREPARE pwned AS DELETE FROM {t}", REFUSED),
    ("execute", "EXECUTE pwned", REFUSED),
    ("describe a host file", "DESCRIBE '{canary}'", REFUSED),
    ("explain a host file", "EXPLAIN SELECT * FROM '{canary}'", REFUSED),
]


def all_cases() -> list[Case]:
    cases = _common() + POSTGRES + MARIADB
    for backend in ("duckdb", "accel_duckdb"):
        cases += _on(backend, "backend functions", DUCKDB_LIKE)
    for backend in ("sqlite", "accel_sqlite"):
        cases += _on(backend, "backend functions", SQLITE_LIKE)
    for backend in ("parquet", "csv"):
        cases += _on(backend, "datafusion file readers", FILES)
    return cases


CASES = all_cases()
