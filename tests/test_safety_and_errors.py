"""Only reads run; refusals and failures reach the client cleanly; the server keeps serving."""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import duckdb
import pyarrow.flight as flight

import pytest
import sqlglot

from federation import tokens
from federation.catalog import Catalog
from federation.connectors import ConnectorError
from federation.connectors.duckdb import DuckDBConnector
from federation.engine import QueryEngine
from federation.safety import GeneratesTooMuch, NotAStatement, UnsafeStatement, check_read_only
from federation.tokens import CACHED_CHARACTERS, _cache, postgres_tokens

from conftest import serving

REFUSED = {
    "insert": "INSERT INTO orders (order_id) VALUES (1)",
    "update": "UPDATE orders SET status = 'x'",
    "delete": "DELETE FROM orders",
    "create_table": "CREATE TABLE t (a INT)",
    "create_table_as": "CREATE TABLE t AS SELECT 1",
    "create_view": "CREATE VIEW v AS SELECT 1",
    "create_external_table": "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
    "drop": "DROP TABLE orders",
    "alter": "ALTER TABLE orders ADD COLUMN x INT",
    "truncate": "TRUNCATE orders",
    "copy_to": "COPY orders TO '/tmp/stolen.csv'",
    "copy_from": "COPY orders FROM '/etc/passwd'",
    "attach": "ATTACH '/tmp/other.duckdb' AS other",
    "set": "SET datafusion.execution.batch_size = 1",
    "install": "INSTALL httpfs",
    "read_parquet": "SELECT * FROM read_parquet('/etc/passwd')",
    "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
    "read_csv_auto": "SELECT * FROM read_csv_auto('/etc/passwd')",
    "read_json": "SELECT * FROM read_json('/etc/hostname')",
    "read_text": "SELECT * FROM read_text('/etc/passwd')",
    "path_as_table": "SELECT * FROM '/etc/passwd'",
    "file_as_table": "SELECT * FROM 'data/metrics.csv'",
    "select_into": "SELECT * INTO stolen FROM orders",
    "two_statements": "SELECT 1; DROP TABLE orders",
    "cte_with_delete": "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
    "explain_write": "EXPLAIN DELETE FROM orders",
    "explain_options_copy": "EXPLAIN (ANALYZE) COPY (SELECT 1) TO '/tmp/stolen.csv'",
    "explain_options_ddl": "EXPLAIN (FORMAT tree) CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
    "explain_comment_copy": "EXPLAIN/**/ANALYZE COPY (SELECT 1) TO '/tmp/stolen.csv'",
    "begin": "BEGIN",
    "pragma": "PRAGMA enable_external_access",
}


@pytest.mark.parametrize("statement", REFUSED.values(), ids=REFUSED.keys())
def test_refused_statement_then_the_next_query_works(connection, statement):
    with connection.cursor() as cursor:
        with pytest.raises(adbc_driver_manager.Error) as raised:
            cursor.execute(statement)
            cursor.fetchall()
        message = str(raised.value)
        assert "not allowed" in message or "only one statement" in message
        assert "Traceback" not in message
        cursor.execute("SELECT count(*) FROM orders")
        assert cursor.fetchone() == (30_000,)


@pytest.mark.parametrize("statement", REFUSED.values(), ids=REFUSED.keys())
def test_gate_refuses(statement):
    with pytest.raises(UnsafeStatement):
        check_read_only(statement)


@pytest.mark.parametrize("statement", ["VACUUM", "CALL p()", "UPSERT INTO t VALUES (1)", "LOAD 'x.so'",
                                       "EXPLAIN ANALYZE INSERT INTO t VALUES (1)", "NOTIFY c"])
def test_gate_names_a_write_as_a_write(statement):
    with pytest.raises(UnsafeStatement, match="not allowed: flightdeck is read-only") as raised:
        check_read_only(statement)
    assert not isinstance(raised.value, NotAStatement)


@pytest.mark.parametrize("statement", [
    "SELECT length(repeat('" + "x" * 100 + "', 5000000)) AS n",    # a long text repeated
    "SELECT length(repeat(repeat('a', 10000), 20000)) AS n",       # nested
    "SELECT cardinality(array_repeat(1, 100000000::bigint)) AS n",  # a cast
    "SELECT repeat('a', 10000 * 10000) AS s", "SELECT repeat('a', 10^9) AS s",  # arithmetic
    "SELECT length(repeat('a', $1)) AS n", "SELECT range(?) AS r",  # a bound size, folded unseen
    "SELECT repeat('a', length('abc')) AS s",                       # a size computed by a function
    "SELECT lpad('a', 20000000) AS p", "SELECT generate_series(1, 100000000, 2) AS g",
    "SELECT range(1, n) FROM t", "SELECT repeat('a', id * 1000) FROM t",  # sizes known only as values are made
])
def test_gate_refuses_constants_that_make_too_much_while_planning(statement):
    with pytest.raises(UnsafeStatement, match="at most 16,777,216|must be written as a number"):
        check_read_only(statement)


@pytest.mark.parametrize("statement", ['SELECT "set_config"(\'a\', \'b\', false) AS x',
                                       'SELECT * FROM "read_csv"(\'/etc/passwd\')', 'SELECT "pg_advisory_lock"(1)'])
def test_gate_knows_a_function_by_its_quoted_name(statement):
    with pytest.raises(UnsafeStatement, match="not allowed"):
        check_read_only(statement)


def _nested(times: int, call: str) -> str:
    expression = "name"
    for _ in range(times):
        expression = call.format(expression)
    return expression


def _doubling_ctes(levels: int, start: str) -> str:
    ctes = [f"t0 AS (SELECT {start} AS s FROM src)"] + [
        f"t{level} AS (SELECT {' || '.join(['s'] * 10)} AS s FROM t{level - 1})" for level in range(1, levels)]
    return "WITH " + ", ".join(ctes) + f" SELECT length(s) AS n FROM t{levels - 1}"


def _list_chain(levels: int, step: str, start: str) -> str:
    """CTEs t0..t<levels>, each made by ``step`` from the one before."""
    ctes = [f"t0 AS (SELECT {start} AS l)"] + [step.format(level, level - 1) for level in range(1, levels + 1)]
    return "WITH " + ", ".join(ctes) + f" SELECT length(CAST(l AS VARCHAR)) AS n FROM t{levels}"


@pytest.mark.parametrize("statement, limit", [
    # Ten letters, each made ten by each level: 1 GB from constants, folded while planning.
    ("SELECT length(" + _nested(8, "replace({}, 'a', 'aaaaaaaaaa')").replace("name", "'aaaaaaaaaa'", 1) + ") AS n",
     "at most 16,777,216"),
    (_doubling_ctes(9, "'aaaaaaaaaa'"), "at most 16,777,216"),   # a chain of CTEs, each ten times its input
    (_doubling_ctes(5, "name"), "at most 1,000 times"),          # the same over a table's values
    (f"SELECT x.s FROM (SELECT {' || '.join(['s'] * 10)} AS s FROM (SELECT {' || '.join(['name'] * 10)} AS s "
     f"FROM src) a) x, (SELECT 1) y WHERE length({' || '.join(['x.s'] * 11)}) > 0",
     "at most 1,000 times"),   # through subqueries, and in a WHERE
    ("SELECT " + _nested(4, "regexp_replace({}, '', 'xxxxxxxxx', 'g')") + " FROM src", "at most 1,000 times"),
    ("SELECT " + _nested(4, "replace({}, '', 'xxxxxxxxx')") + " FROM src", "at most 1,000 times"),  # '' inserts
    ("SELECT " + _nested(4, "encode({}, 'hex')") + " FROM src", "at most 1,000 times"),  # 8 digits a character
    ("SELECT length(array_to_string(array_repeat('a', 10000000), repeat('x', 1000))) AS n", "at most 16,777,216"),
    # Each call within the limit, together past it; a table function's rows are not counted.
    ("SELECT repeat('a', 10000000) AS a, lpad('b', 10000000) AS b FROM range(100000000)", "makes 20,000,000 values"),
    ("WITH RECURSIVE t(s, n) AS (SELECT 'aaaa', 0 UNION ALL SELECT s || s, n + 1 FROM t WHERE n < 40) "
     "SELECT max(length(s)) AS m FROM t", "grows by a factor at every step"),
    ("WITH RECURSIVE t(s, n) AS (SELECT name, 0 FROM src UNION ALL SELECT replace(s, 'a', 'aa'), n + 1 FROM t "
     "WHERE n < 40) SELECT max(length(s)) AS m FROM t", "grows by a factor at every step"),    # Starting from what counts as small (a hash, a number as text, an array of numbers).
    ("SELECT length(" + _nested(30, "encode({}, 'hex')").replace("name", "md5('a')", 1) + ") AS n", "at most 16,777,216"),
    ("WITH RECURSIVE t(s, n) AS (SELECT CAST(7 AS VARCHAR), 0 UNION ALL SELECT s || s, n + 1 FROM t WHERE n < 40) "
     "SELECT max(length(s)) AS m FROM t", "grows by a factor at every step"),
    ("WITH RECURSIVE t(a, n) AS (SELECT [1], 0 UNION ALL SELECT array_concat(a, a), n + 1 FROM t WHERE n < 40) "
     "SELECT max(cardinality(a)) AS m FROM t", "grows by a factor at every step"),
    ("SELECT length(array_to_string(array_repeat('', 1000000), repeat('x', 1000))) AS n", "at most 16,777,216"),
    # Names the gate must resolve as the engine does: another case, a duplicated alias, VALUES'
    # and unnest's columns, an unnamed expression's generated name, an ORDER BY alias.
    ("WITH RECURSIVE t(s, n) AS (SELECT 'a', 0 UNION ALL SELECT T.s || T.s, n + 1 FROM t WHERE n < 40) "
     "SELECT max(length(s)) AS m FROM t", "grows by a factor at every step"),
    ("SELECT length(repeat(x.s, 1000)) AS n FROM (SELECT repeat(name, 1000) AS s FROM src) AS x, "
     "(SELECT 1 AS k) AS x", "at most 1,000 times"),
    ("SELECT length(repeat(column1, 1000)) AS n FROM (VALUES (repeat('a', 16000000)))", "at most 16,777,216"),
    ("WITH v(k, s) AS (VALUES (1, repeat('a', 1600000))) SELECT length(repeat(s, 1000)) AS n FROM v",
     "at most 16,777,216"),
    ("SELECT length(repeat(s, 1000)) AS n FROM unnest([repeat('a', 1600000)]) AS u(s)", "at most 16,777,216"),
    ('SELECT length(repeat("repeat(src.name,Int64(40))", 1000)) AS n FROM (SELECT repeat(name, 40) FROM src)',
     "at most 1,000 times"),
    ("SELECT s AS z FROM (SELECT repeat(name, 400) AS s FROM src) ORDER BY length(repeat(z, 400))",
     "at most 1,000 times"),
    # A value read, inserted throughout another: its square; again, its fourth power.
    ("WITH a AS (SELECT regexp_replace(msg, '', msg, 'g') AS s FROM logs) "
     "SELECT regexp_replace(s, '', s, 'g') AS s FROM a", "as the square"),
    # Calls that repeat one argument once per part of another.
    ("SELECT length(" + _nested(7, "concat_ws({}, " + ", ".join(["''"] * 20) + ")").replace("name", "'x'", 1)
     + ") AS n", "at most 16,777,216"),
    ("SELECT length(" + _nested(4, "array_to_string(array_replace_all(array_repeat('', 1000), '', {}), '')")
     .replace("name", "'x'", 1) + ") AS n", "at most 16,777,216"),
    ("SELECT cardinality(array_resize(['x'], 1000000, repeat('a', 10000))) AS n", "at most 16,777,216"),
    ("SELECT cardinality(list_repeat('a', 100000000)) AS n", "at most 16,777,216"),
    ("SELECT cardinality(\"array_repeat\"('a', 100000000)) AS n", "at most 16,777,216"),
    ("SELECT length(" + _nested(20, "CAST(string_to_array({}, NULL) AS VARCHAR)") + ") AS n FROM src",
     "at most 16,777,216"),
    # A list written as text is longer than the list: each element with its brackets and separator,
    # a number or an interval as many characters as it takes. Split and written again, it grows
    # at each step, through CTEs, arrow_cast, concat and array_to_string as through CAST.
    (_list_chain(14, "t{0} AS (SELECT string_to_array(CAST(l AS VARCHAR), NULL) AS l FROM t{1})",
                 "string_to_array('aaaaaaaaaa', NULL)"), "at most 16,777,216"),
    ("SELECT length(" + _nested(6, "arrow_cast(string_to_array({}, NULL), 'Utf8')").replace("name", "'x'", 1)
     + ") AS n", "at most 16,777,216"),
    ("SELECT length(" + _nested(6, "translate(array_to_string(array_positions(string_to_array({}, NULL), 'a'), ''), "
                                   "'0123456789', 'aaaaaaaaaa')").replace("name", "repeat('a', 1000)", 1) + ") AS n",
     "at most 16,777,216"),
    (_list_chain(6, "t{0} AS (SELECT translate(concat(array_positions(string_to_array(l, NULL), 'a')), "
                    "'0123456789,[] ', 'aaaaaaaaaaaaaa') AS l FROM t{1})", "repeat('a', 1000)"), "at most 16,777,216"),
    ("SELECT length(" + _nested(3, "CAST(string_to_array({}, NULL) AS VARCHAR)") + ") AS n FROM src",
     "at most 1,000 times"),
    # A tuple is a struct holding all its parts: doubled at every CTE, or a thousand copies at once.
    (_list_chain(40, "t{0} AS (SELECT (l, l) AS l FROM t{1})", "repeat('ab', 500)").replace(
        "length(CAST(l AS VARCHAR))", "l"), "at most 16,777,216"),
    ("SELECT make_array((" + ", ".join(["s"] * 1000) + ")) FROM (SELECT repeat('a', 20000) AS s) t",
     "at most 16,777,216"),
    # A value gathered from rows, gathered again from rows a join multiplies: twice as long at each step.
    (_list_chain(3, "t{0} AS (SELECT string_agg(l, '') AS l FROM t{1}, (VALUES (1), (2)) v(x))", "'ab'"),
     "at most 2 string_agg/array_agg"),
    (_list_chain(3, "t{0} AS (SELECT flatten(array_agg(l)) AS l FROM (SELECT l FROM t{1} UNION ALL "
                    "SELECT l FROM t{1}))", "['ab']"), "at most 2 string_agg/array_agg"),
    # A number, a date or a version as text is longer than the one character it was made from.
    ("SELECT repeat(version(), 16000000) AS v", "at most 16,777,216"),
    ("SELECT repeat(CAST(CAST(1 AS DECIMAL(76, 75)) AS VARCHAR), 5000000) AS v", "at most 16,777,216"),
    ("SELECT repeat(arrow_cast(arrow_cast(1, 'Decimal256(76, 75)'), 'Utf8'), 5000000) AS v", "at most 16,777,216"),
    ("SELECT to_char(now(), repeat('%c', 8000000)) AS t", "at most 16,777,216"),
    ("SELECT repeat(CAST(embed('a') AS VARCHAR), 100000) AS s", "at most 16,777,216"),  # 384 numbers as text
    # A list's element takes 8 bytes or more: 3M decimals of 16 bytes, 3M numbers of a range.
    ("SELECT cardinality(array_repeat(CAST(1 AS DECIMAL(38, 0)), 3000000)) AS n", "at most 16,777,216"),
    ("SELECT cardinality(range(3000000)) AS n", "at most 16,777,216"),
    # Case mapping lengthens 'ß' to 'SS'; hex is written from bytes, 8 digits for an emoji.
    (_list_chain(40, "t{0} AS (SELECT upper(replace(l, 'S', 'ß')) AS l FROM t{1})", "'ß'"), "at most 16,777,216"),
    (_list_chain(10, "t{0} AS (SELECT encode(translate(l, '0123456789abcdef', '😀😁😂😃😄😅😆😇😈😉😊😋😌😍😎😏'), "
                     "'hex') AS l FROM t{1})", "'a'"), "at most 16,777,216"),
    # What * stands for: REPLACE's expressions, less EXCEPT's columns; UNION BY NAME matches names.
    (_list_chain(3, "t{0} AS (SELECT * REPLACE (repeat(l, 1000) AS l) FROM t{1})", "'a'"), "at most 16,777,216"),
    (_list_chain(4, "t{0} AS (SELECT * EXCEPT (d) FROM (SELECT 'a' AS d, 'a' AS l) s UNION ALL "
                    "SELECT * EXCEPT (e) FROM (SELECT repeat(l, 1000) AS l, 'a' AS e FROM t{1}) u)", "'a'"),
     "at most 16,777,216"),
    (_list_chain(4, "t{0} AS (SELECT 'a' AS l, 'a' AS y UNION ALL BY NAME SELECT 'a' AS y, repeat(l, 1000) AS l "
                    "FROM t{1})", "'a'"), "at most 16,777,216"),
    ("SELECT array_agg(x) FILTER (WHERE true) OVER (ORDER BY y) AS a FROM t", "as a window function"),
    ("SELECT string_agg(x, ',') IGNORE NULLS OVER (ORDER BY y) AS a FROM t", "as a window function"),
    # POSIX classes: one character to Rust's regular expressions, many to Python's parser.
    ("SELECT length(" + _nested(4, "regexp_replace({}, '[" + "[:alpha:]" * 50 + "]', '" + "a" * 100 + "', 'g')")
     .replace("name", "'a'", 1) + ") AS n", "at most 16,777,216"),
    # A value made for every row is made for a whole batch of rows at once.
    ("SELECT max(length(repeat('a', 16000000) || md5(CAST(value AS VARCHAR)))) AS m FROM range(8192)",
     "a batch of 65,536 rows"),
    ("SELECT length(string_agg(repeat('a', 16000000), '')) AS n FROM range(1000)", "for every row it gathers"),
    ("SELECT length(string_agg(repeat('a', 100), '') OVER (ORDER BY value)) AS n FROM range(100000)",
     "as a window function"),
])
def test_gate_refuses_values_that_grow_without_bound(statement, limit):
    """A value is made whole: no deadline or memory pool stops one being made, so a statement
    must not be able to ask for one of gigabytes (the first took 42 s past a 4 s deadline and
    3.7 GB in a server; one more level, minutes and more memory than the machine has)."""
    with pytest.raises(GeneratesTooMuch, match=limit):
        check_read_only(statement)


def _doubling_reads(levels: int) -> str:
    ctes = ["t0 AS (SELECT 1 AS x)"] + [f"t{n} AS (SELECT x FROM t{n - 1} UNION ALL SELECT x FROM t{n - 1})"
                                        for n in range(1, levels + 1)]
    return "WITH " + ", ".join(ctes) + f" SELECT count(*) AS n FROM t{levels}"


def test_a_statement_whose_ctes_would_be_planned_too_many_times_is_refused():
    """DataFusion plans a CTE again wherever it is read: each CTE reading the one before twice
    doubles the plan (10 levels: 0.1 s of planning, 20: minutes, before any limit holds)."""
    check_read_only(_doubling_reads(8))
    with pytest.raises(GeneratesTooMuch, match="planned more than 1,000 times"):
        check_read_only(_doubling_reads(25))
    check_read_only("WITH a AS (SELECT 1 AS x), b AS (SELECT x FROM a JOIN a AS a2 USING (x)) "
                    "SELECT * FROM b JOIN b AS b2 USING (x) JOIN a USING (x)")
    check_read_only("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 10) "
                    "SELECT * FROM t, t AS u")


def test_a_statement_whose_ctes_would_plan_too_large_is_refused():
    """Few plannings of a wide CTE make a large plan all the same: 1,000 columns read 16 times
    took 4.4 s and 21 MB a plan, read 128 times 27 s and 390 MB, all before any limit holds."""
    def wide(levels: int) -> str:
        columns = ", ".join(f"id + {j} AS c{j}" for j in range(1000))
        ctes = [f"c0 AS (SELECT {columns} FROM t)"]
        ctes += [f"c{n} AS (SELECT * FROM c{n - 1} UNION ALL SELECT * FROM c{n - 1})" for n in range(1, levels + 1)]
        return "WITH " + ", ".join(ctes) + f" SELECT * FROM c{levels}"
    check_read_only(wide(3))
    with pytest.raises(GeneratesTooMuch, match="add more than 50,000 parts"):
        check_read_only(wide(4))
    in_list = ", ".join(str(j) for j in range(100_000))  # a statement's own size is max_sql_length's
    check_read_only(f"WITH c AS (SELECT id FROM t WHERE id IN ({in_list})) SELECT count(*) AS n FROM c")


def test_a_statement_is_split_into_tokens_once_while_it_is_planned(monkeypatch):
    """The gate, the placeholder rewriting and the rewriters each read the statement's tokens:
    a 100,000-value IN list was tokenized eight times (18 s for one statement of 589 KB)."""
    texts = []
    tokenize = sqlglot.tokenize
    monkeypatch.setattr(tokens.sqlglot, "tokenize", lambda sql, read: texts.append(sql) or tokenize(sql, read=read))
    sql = "SELECT count(*) AS n FROM (VALUES (1), (2)) AS t(id) WHERE id IN (" + ", ".join(map(str, range(3000))) + ")"
    assert QueryEngine(Catalog([], Path("."))).query("\r" + sql).read_all().to_pylist() == [{"n": 2}]
    assert texts == ["\r" + sql]
    texts.clear()
    check_read_only("SELECT 'open")  # a text that cannot be split (the engine says where) ...
    check_read_only("SELECT 'open")
    assert texts == ["SELECT 'open"]  # ... is not split again either


def test_the_kept_tokens_are_weighed_by_their_texts_length():
    for n in range(50):
        postgres_tokens(f"SELECT {n} AS n, '{'x' * (CACHED_CHARACTERS // 10)}' AS padding")
    assert _cache.currsize <= CACHED_CHARACTERS and len(_cache) <= 10
    postgres_tokens("SELECT '" + "x" * CACHED_CHARACTERS + "' AS too_long")  # answered, not kept
    assert _cache.currsize <= CACHED_CHARACTERS


def test_a_comment_ended_by_a_lone_carriage_return_is_refused():
    """sqlglot ends a -- comment at a bare \r, DataFusion only at \n: the gate checked
    repeat('a', 20000000 / 100000) and DataFusion made 20,000,000 characters."""
    with pytest.raises(NotAStatement, match="carriage return"):
        check_read_only("SELECT length(repeat('a', 20000000 --\r / 100000\n)) AS n")
    check_read_only("SELECT 1 AS a -- a comment\r\nFROM t\r\n")
    check_read_only("SELECT 'one\rtwo' AS text")  # in a text it is a character like any other


@pytest.mark.parametrize("statement", [
    "SELECT 1 AS a /*! , 2 AS b */",
    "SELECT 1 AS a /*!50000 , 2 AS b */",
    "SELECT 1 AS a /*M! , 2 AS b */",
    "SELECT length(repeat('a', 1) /*! || repeat('a', 50000000) */) AS n",
    "SELECT 1 AS a /* /*! , 2 AS b */ */",  # the mark inside another comment is refused too: where a
    "SELECT 1 AS a -- /*! , 2 AS b */\n",    # comment ends is where the two parsers may differ
    "SELECT 'open /*! , 2 AS b */",  # not even split into words
])
def test_a_comment_the_engine_would_run_as_sql_is_refused(statement):
    """DataFusion reads the text of a /*! ... */ comment as part of the statement, the gate as a
    comment: what is inside went unchecked (a value of 50,000,000 characters, a chain deep
    enough to end the process)."""
    with pytest.raises(NotAStatement, match="/\\*! ... \\*/ comment"):
        check_read_only(statement)


@pytest.mark.parametrize("statement", ["SELECT '/*! , 2 AS b */' AS text", 'SELECT 1 AS "/*!x"',
                                       "SELECT 1 AS a /* ! not one */"])
def test_the_executable_comment_mark_in_a_text_a_name_or_another_comment_passes(statement):
    check_read_only(statement)


@pytest.mark.parametrize("statement", [
    "SELECT count(*) AS n FROM (SELECT " + ", ".join(str(i) for i in range(15_000)) + ") AS t",
    "SELECT * FROM (VALUES (" + ", ".join(str(i) for i in range(3_000)) + ")) AS t",
])
def test_a_select_list_or_a_row_too_wide_to_plan_quickly_is_refused(statement):
    """DataFusion plans a projection in time growing with the square of its width, before any
    deadline: 15,000 constants under a key's 5 s timeout answered after 21 s."""
    with pytest.raises(GeneratesTooMuch, match="at most 2,000"):
        check_read_only(statement)


def test_select_lists_and_values_up_to_the_width_limit_pass():
    check_read_only("SELECT " + ", ".join(f"{i} AS c{i}" for i in range(2_000)))
    check_read_only("SELECT count(*) AS n FROM (VALUES " + ", ".join(f"({i})" for i in range(20_000)) + ") AS t(v)")


@pytest.mark.parametrize("statement", [
    "SELECT 1 AS `'`, 2 /*! + 41 */ AS y -- '",  # the engine ran + 41: the gate read a text
    "SELECT 1 AS `'`, " + ", ".join(str(i) for i in range(2_500)) + " -- '",
    "SELECT 1 AS `'`, (" + " OR ".join(["1 = 1"] * 1_200) + ") AS x -- '",
    'SELECT 1 AS `"`, 2 AS y -- "',
    "SELECT 1 AS `a--b`", "SELECT 1 AS `a/*b`", "SELECT 1 AS `$x`", "SELECT 1 AS `\\`",
    "SELECT 1 AS `'",  # not even split into words
])
def test_a_backquoted_name_the_gate_would_read_on_from_is_refused(statement):
    """The gate's tokenizer knows no backquotes: from a quote inside one it read a text running to
    the next quote, and everything the engine ran in between went unchecked."""
    with pytest.raises(NotAStatement, match="backquoted"):
        check_read_only(statement)


@pytest.mark.parametrize("statement", ["SELECT 1 AS `a b`", "SELECT `a` FROM (SELECT 1 AS a) AS t WHERE `a` = 1",
                                       "SELECT '`' AS t, '`--' AS u", 'SELECT 1 AS "`\'"'])
def test_plain_backquoted_names_and_backquotes_in_texts_pass(statement):
    check_read_only(statement)


WIDE = ", ".join(f"{i} AS c{i}" for i in range(1_500))


@pytest.mark.parametrize("statement", [
    "SELECT * FROM (VALUES (" + ", ".join(str(i) for i in range(1_500)) + ")) AS a, (VALUES ("
    + ", ".join(str(i) for i in range(1_500)) + ")) AS b",
    f"WITH w AS (SELECT {WIDE}) SELECT * FROM w AS a, w AS b",
    f"SELECT * FROM (SELECT {WIDE}) AS a JOIN (SELECT {WIDE}) AS b ON true",
    f"SELECT a.*, a.* FROM (SELECT {WIDE}) AS a",
])
def test_a_star_over_subqueries_too_wide_together_is_refused(statement):
    """A * stands for the columns of what it reads: two derived tables of 2,000 columns each
    joined made 4,000, planned in 3 s."""
    with pytest.raises(GeneratesTooMuch, match="at most 2,000"):
        check_read_only(statement)


def test_a_star_counts_only_what_it_stands_for():
    check_read_only(f"SELECT a.* FROM (SELECT {WIDE}) AS a, (SELECT {WIDE}) AS b")
    check_read_only(f"SELECT * FROM (SELECT {WIDE} UNION ALL SELECT {WIDE}) AS u")
    check_read_only("SELECT * FROM orders AS o JOIN customers AS c ON o.id = c.id")  # tables: not known here


DESCRIBED = {
    "a deep chain": "DESCRIBE SELECT 1 AS one WHERE " + " OR ".join(["1 = 1"] * 14_000),
    "a deep chain in parentheses": "DESCRIBE (SELECT 1 AS one WHERE " + " OR ".join(["1 = 1"] * 14_000) + ")",
    "a deep chain after a CTE": "DESCRIBE WITH t AS (SELECT 1 AS x) SELECT * FROM t WHERE "
                                + " OR ".join(["x = 1"] * 14_000),
    "a giant value": "DESC SELECT length(repeat('a', 300000000)) AS n",
    "CTEs read too many times": "DESCRIBE " + _doubling_reads(25),
    "a write": "DESCRIBE DELETE FROM orders",
    "VERBOSE": "DESCRIBE VERBOSE SELECT " + ", ".join(str(i) for i in range(2_500)),
    "QUERY PLAN": "DESCRIBE QUERY PLAN (SELECT 1 AS one WHERE " + " OR ".join(["1 = 1"] * 1_200) + ")",
    "ESTIMATE": "DESC ESTIMATE SELECT length(repeat('a', 300000000)) AS n",
    "ANALYZE": "DESCRIBE ANALYZE VERBOSE SELECT 1 AS one WHERE " + " OR ".join(["1 = 1"] * 1_200),
    "a DESCRIBE": "DESCRIBE " * 1_100 + "SELECT 1 AS one",
    "an EXPLAIN": "DESCRIBE EXPLAIN SELECT 1 AS one",
}


@pytest.mark.parametrize("label", DESCRIBED)
def test_a_described_statement_passes_the_checks_a_query_does(label):
    """DESCRIBE <query> plans the query: a chain deep enough to overflow the planner's stack
    ended the process when it came after DESCRIBE (``TooDeep`` is how the gate says so)."""
    with pytest.raises((UnsafeStatement, RecursionError)):
        check_read_only(DESCRIBED[label])


@pytest.mark.parametrize("statement", [
    "DESCRIBE orders", "DESC orders", 'DESCRIBE "select"', "DESCRIBE public.orders", "DESCRIBE SELECT 1 AS one",
    "DESCRIBE (SELECT 1 AS one)", "DESCRIBE comment", "DESCRIBE copy", 'DESCRIBE public."my table"',
    "DESCRIBE VERBOSE SELECT 1 AS one", "DESCRIBE /**/ SELECT 1 AS one", "desc (with t as (select 1 as x) select * from t)"])
def test_describing_a_table_or_a_small_query_passes(statement):
    check_read_only(statement)


@pytest.mark.parametrize("statement", [
    "SELECT `x` FROM (SELECT 1 AS x) t WHERE " + " OR ".join(["x = 1"] * 13_000),  # overflowed the planner's stack
    "WITH " + ", ".join(["c0 AS (SELECT 1 AS x)"] + [f"c{n} AS (SELECT * FROM c{n - 1} UNION ALL SELECT * FROM c{n - 1})"
                                                   for n in range(1, 15)]) + " SELECT count(`x`) FROM c14",
    "SELECT `a`, count(*) FROM t GROUP BY CUBE (`a`, b, c)",
])
def test_a_statement_the_gate_cannot_parse_is_kept_short_and_its_ctes_weighed(statement):
    """A backquoted name sends a statement down the path that cannot build a tree: its depth,
    CTE expansion and grouping sets are bounded from its words (13,000 ORs crashed the server;
    14 doubling CTEs took 17 s to plan)."""
    with pytest.raises(GeneratesTooMuch):
        check_read_only(statement)


def _nested_doubling_reads(levels: int) -> str:
    statement = "SELECT 1 AS x"
    for level in range(levels):
        statement = (f"WITH n{level} AS ({statement}) "
                     f"SELECT x FROM n{level} UNION ALL SELECT x FROM n{level}")
    return statement


def test_ctes_nested_inside_each_other_are_weighed_at_any_depth():
    """The same doubling written as a WITH inside each CTE's body rather than as a chain: each
    CTE is weighed once its inner ones are, however deep they nest."""
    check_read_only(_nested_doubling_reads(8))
    with pytest.raises(GeneratesTooMuch, match="planned more than 1,000 times"):
        check_read_only(_nested_doubling_reads(12))


def test_a_group_by_of_too_many_grouping_sets_is_refused():
    """Each grouping set is planned: a CUBE of n columns makes 2^n (of 17: 0.6 s and 150 MB of
    planning, doubling with each column, outside the memory pool)."""
    columns = ", ".join(f"c{n}" for n in range(30))
    with pytest.raises(GeneratesTooMuch, match="1,073,741,824 grouping sets"):
        check_read_only(f"SELECT count(*) AS n FROM t GROUP BY CUBE({columns})")
    with pytest.raises(GeneratesTooMuch, match="grouping sets"):
        check_read_only("SELECT count(*) AS n FROM t GROUP BY CUBE(a, b, c, d, e, f, g, h, i, j), ROLLUP(k, l, m, n)")
    check_read_only("SELECT count(*) AS n FROM t GROUP BY CUBE(a, b, c), ROLLUP(d, e), GROUPING SETS ((f), (g))")


def test_a_star_stands_for_the_columns_of_what_its_select_reads():
    """Not every CTE before it: counted over all of them, each CTE of a chain reading the one
    before doubled the gate's own work (30 of them: most of an hour)."""
    check_read_only(_list_chain(30, "t{0} AS (SELECT * FROM t{1})", "'a'"))


@pytest.mark.parametrize("statement", ["EXPLAIN SELECT 'unterminated", "EXPLAIN (ANALYZE SELECT '/etc/e, VERBOSE) x"])
def test_an_explain_the_gate_cannot_split_into_words_is_a_syntax_error(statement):
    with pytest.raises(NotAStatement, match="syntax error: EXPLAIN takes a query"):
        check_read_only(statement)


def test_a_statement_the_size_bound_fails_on_is_refused_not_let_through(monkeypatch):
    def failing(_sizer):
        raise KeyError("a construct the bound does not know")
    monkeypatch.setattr("federation.sizes._Sizer.check", failing)
    with pytest.raises(GeneratesTooMuch, match="cannot bound the values"):
        check_read_only("SELECT replace(name, 'a', 'b') AS n FROM src")


def test_growth_is_bounded_where_the_gate_cannot_resolve_the_statement_s_scopes(monkeypatch):
    def unresolved(_tree):
        raise ValueError("cannot resolve")
    monkeypatch.setattr("federation.sizes.traverse_scope", unresolved)
    with pytest.raises(GeneratesTooMuch, match="at most 1,000 times"):
        check_read_only("SELECT " + _nested(4, "replace({}, '', 'xxxxxxxxx')") + " FROM src")
    check_read_only("SELECT replace(name, 'a', 'b') AS n FROM src")


@pytest.mark.parametrize("statement, refused", [
    # The engine reads "t SAMPLE 1" and `backquoted` names (sqlglot does not): what is inside would
    # go unchecked, so only calls of small results or of one of their arguments may be made there.
    ("SELECT replace(replace('aaaaaaaaaa', 'a', 'aaaaaaaaaa'), 'a', 'aaaaaaaaaa') AS s FROM (SELECT 1) t SAMPLE 1",
     "calls replace"),
    ("WITH t0 AS (SELECT 'ab' AS `s`), t1 AS (SELECT overlay(s PLACING s FROM 1 FOR 0) AS s FROM t0) "
     "SELECT length(s) FROM t1", "calls overlay"),    # each such CTE doubles its text
    ("SELECT array_concat(s, s) AS `x` FROM t", "calls array_concat"),
    ("SELECT 1 AS one, array_concat(s, s) AS `x` FROM t", "calls array_concat"),  # not a CTE's column names
    ('SELECT "repeat"(s, 3) AS `x` FROM t', "calls repeat"),
    ("SELECT (s, s) AS `x` FROM t", "makes a tuple"), ("SELECT [s, s] AS `x` FROM t", "uses ["),
    ("SELECT s || s AS `x` FROM t", "uses ||"),
])
def test_a_statement_the_gate_cannot_read_may_not_make_values_it_would_bound(statement, refused):
    with pytest.raises(GeneratesTooMuch, match=re.escape(refused) + ", whose values are bounded"):
        check_read_only(statement)


@pytest.mark.parametrize("statement", [
    "SELECT 1 AS one FROM (SELECT 1) t SAMPLE 1",
    "SELECT count(*) AS `n`, max(`name`) FROM `orders` WHERE `id` IN (1, 2, 3) GROUP BY `region`",
    "SELECT CAST(`a` AS INT) AS `x`, coalesce(`b`, 0) FROM (SELECT * FROM t) AS v(a, b)",
    "WITH w(a, b) AS (SELECT 1, 2) SELECT `a` FROM w", "SELECT * FROM (VALUES (1, 'a'), (2, 'b')) AS `v`(n, s)",
    "SELECT sum(x) FILTER (WHERE x > 1), count(*) OVER (PARTITION BY a, b ORDER BY c) FROM `t`",
    "SELECT * FROM generate_series(1, 10) AS `g`", "SELECT `x` FROM t WHERE EXISTS (SELECT 1, 2 FROM u)",
    "SELECT predict('churn', label, f1, f2, f3) AS p FROM features",  # sqlglot knows a predict of 3 arguments
    "WITH a(x, y) AS (SELECT 1, 2), b(z) AS (SELECT 3) SELECT `x` FROM a, b", "SELECT `a` FROM t AS u(a, b)",
])
def test_a_statement_the_gate_cannot_read_is_left_to_the_engine_when_it_makes_nothing_larger(statement):
    check_read_only(statement)


def test_a_statement_not_even_split_into_words_is_a_syntax_error_if_it_could_make_values():
    with pytest.raises(NotAStatement, match="syntax error"):
        check_read_only("SELECT repeat('a', 3) FROM t WHERE x = 'abc")
    check_read_only("SELECT 1 WHERE x = 'abc")  # the engine says where its quote is unterminated


@pytest.mark.parametrize("statement", [
    "SELECT name || ' ' || region AS label FROM src",
    "WITH a AS (SELECT a || b AS s, c FROM t) SELECT s || ': ' || c AS line FROM a",
    "WITH RECURSIVE t(n, path) AS (SELECT 1, 'a' UNION ALL SELECT n + 1, path || '/x' FROM t WHERE n < 10) "
    "SELECT * FROM t",   # grows by the same amount at each step
    "WITH RECURSIVE t(n, path) AS (SELECT 1, name FROM src UNION ALL SELECT t.n + 1, t.path || e.name "
    "FROM t JOIN edges e ON e.id = t.n WHERE t.n < 10) SELECT * FROM t",
    "SELECT replace(body, chr(10), '<br/>') AS html FROM docs",
    "SELECT regexp_replace(x, '(\\w+)', '<\\1>', 'g') AS tagged FROM t",
    "WITH a AS (SELECT x + y AS x, x * y AS y FROM t), b AS (SELECT x + y AS x, x * y AS y FROM a), "
    "c AS (SELECT x + y AS x, x * y AS y FROM b) SELECT * FROM c",   # numbers do not grow
    "SELECT * FROM (VALUES (1, 'a'), (2, 'b')) AS v(n, s)", "SELECT (SELECT max(name) FROM src) || 'x' AS y",
    "SELECT array_to_string(tags, ', ') AS t FROM t",    # Escaping HTML: each character grows once at most, whatever the number of calls.
    "SELECT replace(replace(replace(replace(replace(body, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'), "
    "'\"', '&quot;'), '''', '&#39;') AS html FROM docs",
    # Log lines to templates: each match is at least as long as what replaces it.
    "SELECT regexp_replace(regexp_replace(regexp_replace(regexp_replace(regexp_replace(msg, "
    "'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g'), "
    "'[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+', '<ip>', 'g'), '0x[0-9a-f]+', '<hex>', 'g'), '[0-9]+', '<num>', 'g'), "
    "'\"[^\"]*\"', '<str>', 'g') AS template FROM logs",
    "WITH RECURSIVE t(id, path, parent_path) AS (SELECT id, name, '' FROM emp WHERE boss IS NULL UNION ALL "
    "SELECT e.id, t.path || ' > ' || e.name, t.path FROM t JOIN emp e ON e.boss = t.id) SELECT * FROM t",
    "WITH a AS (SELECT x || y AS s, id FROM t), " + ", ".join(
        f"{name} AS (SELECT s || ' ' || region AS s, id FROM {previous} JOIN regions USING (id))"
        for previous, name in zip("abcd", "bcde")) + " SELECT s FROM e",   # unqualified names beside a table
    "SELECT replace(template, '{name}', name) AS line FROM msgs",
    "SELECT service, string_agg(msg, '; ') AS msgs FROM logs GROUP BY service",
    # Lists written out once: each element may grow, the list does not keep growing.
    "SELECT CAST(string_to_array(tags, ',') AS VARCHAR) AS t FROM t",
    "SELECT region, array_to_string(array_agg(name), ', ') AS names FROM src GROUP BY region",
    "SELECT concat(make_array(1, 2, 3)) AS s, arrow_cast(range(10), 'Utf8') AS r",
    "SELECT unnest(string_to_array(tags, ',')) AS tag FROM t",
    "WITH a AS (SELECT string_to_array(tags, ',') AS l FROM t) SELECT array_to_string(l, ' | ') AS s FROM a",
    "SELECT region, string_agg(names, '; ') AS s FROM (SELECT region, city, string_agg(name, ',') AS names "
    "FROM t GROUP BY region, city) GROUP BY region",   # gathered twice: once over the other
    "SELECT (a, b) AS pair FROM t", "SELECT * FROM t WHERE (a, b) IN ((1, 2), (3, 4))",
    "SELECT to_char(created, '%Y-%m-%d') AS day, version() AS v FROM t",
    "SELECT path, embed(content) AS e, cosine_distance(embed(content), embed('too many clients')) AS d FROM guides",
    "SELECT upper(name), lower(city), initcap(x), encode(sha256(x), 'hex') AS h FROM t",
    "SELECT * EXCLUDE (secret) FROM t", "SELECT * REPLACE (upper(name) AS name) FROM t",
    "SELECT region, count(*) AS n FROM t GROUP BY CUBE(region, city, product)",
    "SELECT cardinality(array_repeat(0, 1000000)) AS n, range(1000) AS r",
])
def test_gate_passes_values_that_grow_a_bounded_amount(statement):
    check_read_only(statement)


@pytest.mark.parametrize("statement", [
    "SELECT repeat(name, 3) FROM t", "SELECT lpad(x, 10, '0') FROM t", "SELECT repeat('ab', 3) AS s",
    "SELECT * FROM range(100000000)", "SELECT * FROM t JOIN range(100000000) r ON true",
    "SELECT generate_series(1, 10) AS g",
])
def test_gate_passes_generating_calls_of_bounded_or_streamed_size(statement):
    check_read_only(statement)


@pytest.mark.parametrize("statement", ["SELEC 1", "selct * from orders", "EXPLAIN SELEC 1", "ORDERS", "42"])
def test_gate_answers_a_typo_as_a_syntax_error_not_as_a_write(statement):
    with pytest.raises(NotAStatement, match="syntax error"):
        check_read_only(statement)


def test_a_typo_reaches_the_client_as_invalid_sql(connection):
    with connection.cursor() as cursor:
        with pytest.raises(adbc_driver_manager.Error) as raised:
            cursor.execute("SELEC order_id FROM orders")
            cursor.fetchall()
        assert "syntax error: no statement starts with 'SELEC'" in str(raised.value)
        assert "read-only" not in str(raised.value)


@pytest.mark.parametrize("statement", [
    "SELECT 1", "  -- leading comment\n SELECT * FROM orders", "WITH x AS (SELECT 1) SELECT * FROM x",
    "EXPLAIN SELECT * FROM orders", "EXPLAIN ANALYZE SELECT 1", "SHOW TABLES", "DESCRIBE orders",
    "(SELECT 1) UNION ALL (SELECT 2)", "VALUES (1, 2)", "SELECT 1;", "SELECT 'DROP TABLE x' AS s",
    "EXPLAIN (FORMAT tree) SELECT 1", "EXPLAIN (ANALYZE true, VERBOSE) SELECT * FROM orders", "explain (select 1)",
])
def test_gate_passes_reads(statement):
    check_read_only(statement)


def test_show_describe_and_explain_run(connection):
    with connection.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        assert ("flightdeck", "public", "orders", "BASE TABLE") in cursor.fetchall()
        cursor.execute("DESCRIBE orders")
        assert cursor.fetchall()[0][0] == "order_id"
        cursor.execute("EXPLAIN SELECT status FROM orders WHERE order_id = 100001")
        plan = " ".join(str(row) for row in cursor.fetchall())
        assert "order_id" in plan


def test_bad_sql_is_a_precise_error(connection):
    with connection.cursor() as cursor:
        with pytest.raises(adbc_driver_manager.Error, match="No field named nope"):
            cursor.execute("SELECT nope FROM orders")
        with pytest.raises(adbc_driver_manager.Error, match="not found"):
            cursor.execute("SELECT * FROM no_such_table")
        with pytest.raises(adbc_driver_manager.Error) as raised:
            cursor.execute("SELECT 1/0")
            cursor.fetchall()
        assert "Divide by zero" in str(raised.value) and "Traceback" not in str(raised.value)
        for sql, values in (("SELECT * FROM orders WHERE order_id = 'abc'", None),
                            ("SELECT * FROM orders WHERE order_id = ?", ["abc"])):
            with pytest.raises(adbc_driver_manager.Error, match="Cannot cast string 'abc'") as raised:
                cursor.execute(sql, values)
                cursor.fetchall()
            assert "INTERNAL" not in str(raised.value)
        cursor.execute("SELECT 2")
        assert cursor.fetchone() == (2,)


def test_duckdb_connector_sessions_are_locked(tmp_path):
    path = tmp_path / "locked.duckdb"
    with duckdb.connect(str(path)) as setup:
        setup.execute("CREATE TABLE t AS SELECT 1 AS a")
    connector = DuckDBConnector({"duckdb_open": str(path)}, tmp_path)
    with pytest.raises(ConnectorError, match="(?i)read-only|read only"):
        connector.execute_sql("INSERT INTO t VALUES (2)").read_all()
    with pytest.raises(ConnectorError, match="read_csv\\(\\) is not allowed"):
        connector.execute_sql("SELECT * FROM read_csv('/etc/passwd')").read_all()
    with pytest.raises(ConnectorError, match="(?i)external access|disabled"):  # the session's lock, beneath
        connector.open_stream("SELECT * FROM read_csv('/etc/passwd')", None, None).read_all()
    with pytest.raises(ConnectorError, match="(?i)only one SELECT is sent, not SET"):
        connector.execute_sql("SET enable_external_access = true").read_all()
    with pytest.raises(ConnectorError, match="(?i)only one SELECT is run, not SET"):  # DuckDB's parser says so too
        connector.open_stream("SET enable_external_access = true", None, None).read_all()
    with pytest.raises(duckdb.Error, match="(?i)lock|configuration"):  # the session's own lock, beneath
        connector._cursor().execute("SET enable_external_access = true")
    assert connector.execute_sql("SELECT a FROM t").read_all().to_pylist() == [{"a": 1}]
    connector.close()


def test_unavailable_backend_does_not_stop_startup_or_other_queries(tmp_path):
    (tmp_path / "ok.csv").write_text("a,b\n1,x\n2,y\n")
    config = {"datasets": [
        {"from": "duckdb:orders", "name": "gone", "params": {"duckdb_open": "missing.duckdb"}},
        {"from": "file:ok.csv", "name": "ok"},
    ]}
    with serving(config, tmp_path) as runtime, \
            flightsql.connect(runtime.flight_url, autocommit=True) as conn, conn.cursor() as cursor:
        assert runtime.catalog.datasets["public.gone"].state == "unavailable"
        with pytest.raises(adbc_driver_manager.Error) as raised:
            cursor.execute("SELECT * FROM gone")
        message = str(raised.value)
        assert "dataset gone is unavailable" in message and "missing.duckdb" in message
        assert "(Unavailable;" in message  # gRPC UNAVAILABLE, as ADBC reports it
        cursor.execute("SELECT sum(a) FROM ok")
        assert cursor.fetchone() == (3,)


def test_a_sqlite_file_gone_after_startup_is_an_unavailable_source(tmp_path):
    """The file a SQLite dataset reads went away: opening it failed outside the connector's
    error handling, and the client got an internal error (OperationalError)."""
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        db.execute("CREATE TABLE t (id INTEGER, v INTEGER)")
        db.execute("INSERT INTO t VALUES (1, 2)")
    config = {"datasets": [{"from": "sqlite:t", "name": "t", "params": {"sqlite_file": "s.sqlite"}}]}
    with serving(config, tmp_path) as runtime, \
            flightsql.connect(runtime.flight_url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT sum(v) FROM t")
        assert cursor.fetchone() == (2,)
        (tmp_path / "s.sqlite").rename(tmp_path / "moved.sqlite")
        for sql in ("SELECT sum(v) FROM t", "SELECT * FROM t", "SELECT a.id FROM t a JOIN t b ON a.id = b.id"):
            with pytest.raises(adbc_driver_manager.Error) as raised:
                cursor.execute(sql)
                cursor.fetchall()
            message = str(raised.value)
            assert "unable to open database file" in message and "(Unavailable;" in message, message
            assert "internal error" not in message


API_KEY = "fd-test-key-0123456789"
PASSWORD = "s3cret-password-xyz"


def test_auth_with_api_keys_and_passwords(tmp_path):
    (tmp_path / "ok.csv").write_text("a\n1\n")
    config = {"datasets": [{"from": "file:ok.csv", "name": "ok"}],
              "runtime": {"flight": {"port": 0},
                          "auth": {"api_keys": ["${env:FD_KEY}"],
                                   "users": [{"username": "agent", "password": "${env:FD_PASSWORD}"}]}}}
    environ = {"FD_KEY": API_KEY, "FD_PASSWORD": PASSWORD}
    with serving(config, tmp_path, environ) as runtime:
        url = runtime.flight_url
        with flightsql.connect(url, db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {API_KEY}"},
                               autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT a FROM ok")
            assert cursor.fetchall() == [(1,)]
        with flightsql.connect(url, db_kwargs={"username": "agent", "password": PASSWORD},
                               autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT a FROM ok")
            assert cursor.fetchall() == [(1,)]
        for kwargs in ({}, {"adbc.flight.sql.authorization_header": "Bearer wrong"},
                       {"username": "agent", "password": "wrong"}):
            with pytest.raises(adbc_driver_manager.Error) as raised:
                with flightsql.connect(url, db_kwargs=kwargs, autocommit=True) as conn, \
                        conn.cursor() as cursor:
                    cursor.execute("SELECT a FROM ok")
            message = str(raised.value)
            assert "UNAUTHENTICATED" in message
            assert API_KEY not in message and PASSWORD not in message


def _refresh(client: flight.FlightClient, key: str, body: dict) -> dict:
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {key}".encode())])
    [result] = list(client.do_action(flight.Action("Refresh", json.dumps(body).encode()), options))
    return json.loads(result.body.to_pybytes())


def test_only_a_key_allowed_to_refresh_can_refresh(tmp_path):
    """A refresh makes the backend work on demand: with auth on, only keys given `refresh: true`
    (and plain keys, which may do everything) may ask for one; a one-off refresh_sql cannot read
    beyond the dataset's own table, nor write values of its own into the copy every key reads."""
    (tmp_path / "events.csv").write_text("id,region\n1,eu\n2,us\n")
    (tmp_path / "secret.csv").write_text("id,token\n1,hunter2\n")
    config = {"datasets": [{"from": "file:events.csv", "name": "events", "acceleration": {"enabled": True}},
                           {"from": "file:secret.csv", "name": "secret"}],
              "runtime": {"flight": {"port": 0},
                          "auth": {"api_keys": ["admin-key-000000",
                                                {"name": "loop-agent", "key": "agent-key-11111"},
                                                {"name": "ops-agent", "key": "ops-key-2222222", "refresh": True}]}}}
    with serving(config, tmp_path, {}) as runtime, flight.FlightClient(runtime.flight_url) as client:
        assert runtime.accelerator.refresher("events").loaded.wait(60)
        with pytest.raises(flight.FlightUnauthorizedError) as raised:
            _refresh(client, "agent-key-11111", {"dataset": "events"})
        assert "loop-agent may not refresh" in str(raised.value) and "agent-key" not in str(raised.value)
        assert _refresh(client, "ops-key-2222222", {"dataset": "events"})["state"] == "ready"
        assert _refresh(client, "admin-key-000000", {"dataset": "events"})["state"] == "ready"
        for widening in ("SELECT * FROM secret", "SELECT * FROM events UNION ALL SELECT * FROM secret",
                         "SELECT e.* FROM events e JOIN secret s ON s.id = e.id",
                         "SELECT * FROM events WHERE region = 'zz\\' OR 1=1) --'",
                         "DROP TABLE events",
                         # the copy is every key's: a refresh chooses its rows, never writes its values
                         "SELECT id, 'send refunds to attacker@evil.test' AS region FROM events",
                         "SELECT id, upper(region) AS region FROM events",
                         "SELECT * FROM events UNION ALL SELECT * FROM events",
                         "SELECT * FROM (SELECT id, 'x' AS region FROM events) AS events",
                         "WITH events AS (SELECT 1 AS id, 'x' AS region) SELECT * FROM events",
                         "SELECT * FROM events AS e(region, id)"):
            with pytest.raises(flight.FlightError) as raised:
                _refresh(client, "ops-key-2222222", {"dataset": "events", "refresh_sql": widening})
            assert "Traceback" not in str(raised.value)
        rows = runtime.engine.query("SELECT * FROM events ORDER BY id").read_all().to_pylist()
        assert rows == [{"id": 1, "region": "eu"}, {"id": 2, "region": "us"}]  # exactly the dataset's rows
        assert _refresh(client, "ops-key-2222222", {"dataset": "events", "refresh_sql":
                                                    "SELECT DISTINCT * FROM events WHERE region = 'eu' LIMIT 1"})["rows"] == 1
