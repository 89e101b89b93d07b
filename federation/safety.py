"""The SQL safety gate: only read statements pass.

This is the first of two locks. The second is the engine itself: DataFusion runs
every statement with DDL, DML and session statements disabled, and the DuckDB
sessions the stack opens have external access disabled and their configuration
locked. The gate exists to give a precise message before anything is planned.
"""
from __future__ import annotations

import functools
import logging
import re

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from federation.sizes import TooLarge, call_name, check_sizes
from federation.tokens import parse_postgres, postgres_tokens
from federation.unread import MAX_EXPANDED, Unreadable, check_unread, closing_parentheses

log = logging.getLogger(__name__)

READ_STATEMENTS = ("SELECT", "WITH", "VALUES", "EXPLAIN", "SHOW", "DESCRIBE", "DESC")

# First words of statements that write, change a session or a transaction, or run code, in the
# dialects of every engine and backend the stack speaks: refused as such. Any other first word
# is not a statement flightdeck knows (a typo, say) and is answered as a syntax error. Both are
# refused; the list only chooses which of the two messages is true.
WRITE_STATEMENTS = frozenset("""
    INSERT UPDATE DELETE MERGE UPSERT REPLACE CREATE DROP ALTER TRUNCATE RENAME COMMENT COPY
    UNLOAD GRANT REVOKE SET RESET USE PRAGMA ATTACH DETACH INSTALL LOAD FORCE IMPORT EXPORT
    BEGIN START COMMIT ROLLBACK ABORT END SAVEPOINT RELEASE LOCK UNLOCK PREPARE EXECUTE EXEC
    DEALLOCATE CALL DO DECLARE OPEN FETCH MOVE CLOSE HANDLER NOTIFY LISTEN UNLISTEN VACUUM
    ANALYZE CHECKPOINT REINDEX CLUSTER REFRESH DISCARD SECURITY REASSIGN OPTIMIZE REPAIR FLUSH
    PURGE KILL SHUTDOWN BACKUP RESTORE PUT GET REMOVE UNDROP MSCK CACHE UNCACHE OVERWRITE
""".split())

# Table functions that would read host files or the network, in any engine the stack embeds.
FILE_READING_FUNCTIONS = {
    "read_parquet", "parquet_scan", "read_csv", "read_csv_auto", "csv_scan", "read_json",
    "read_json_auto", "read_json_objects", "read_ndjson", "read_ndjson_auto",
    "read_ndjson_objects", "json_scan", "read_text", "read_blob", "glob", "read_avro",
    "read_arrow", "read_xlsx", "sqlite_scan", "sqlite_attach", "postgres_scan",
    "postgres_query", "mysql_scan", "mysql_query", "iceberg_scan", "delta_scan",
    "parquet_metadata", "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata",
    "httpfs", "read_file", "lo_import", "pg_read_file", "pg_read_binary_file", "load_file",
}

# Functions that lock, change the session, move a sequence, touch host files or reach other
# servers: a read-only session still runs them, so no statement may call them. (Slow ones such
# as pg_sleep are left to the query timeout.)
SIDE_EFFECT_FUNCTIONS = {
    "set_config", "nextval", "setval", "lo_import", "lo_export", "lo_from_bytea", "lo_put",
    "lo_unlink", "dblink", "dblink_exec", "dblink_connect", "dblink_send_query",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_ls_dir", "pg_stat_file",
    "pg_file_write", "get_lock", "release_lock", "release_all_locks", "load_extension",
    "writefile", "readfile", "fts3_tokenizer", "edit",
} | {f"pg_{kind}advisory_{scope}lock{shared}" for kind in ("", "try_") for scope in ("", "xact_")
     for shared in ("", "_shared")}

_WRITE_NODES = (
    exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter,
    exp.TruncateTable, exp.Copy, exp.Set, exp.Command, exp.Attach, exp.Detach,
    exp.Use, exp.Pragma, exp.Transaction, exp.Commit, exp.Rollback, exp.Into,
    exp.LoadData, exp.Grant, exp.Lock,
)
_NODE_NAMES = {exp.Lock: "SELECT ... FOR UPDATE/SHARE (a row lock)"}


class UnsafeStatement(ValueError):
    """A statement the stack refuses to run; the message is safe to show a client."""


class NotAStatement(UnsafeStatement):
    """Text that does not start the way any statement does: a syntax error, not a write."""


# Levels of expressions a statement may nest. The engine's planner recurses once per level
# on a thread's stack: a chain of some thousands of ORs overflows it and ends the process.
MAX_DEPTH = 1000
# Grouping sets one GROUP BY may make (a CUBE of 12 columns: planned in 0.04 s here, of 17: 0.6 s
# and 150 MB, doubling with each column).
MAX_GROUPING_SETS = 4096
MAX_EXPANDED_NODES = 50_000  # parts of the CTEs a statement reads, each inlined wherever it is read
# Columns one SELECT makes, values one row of a VALUES holds: DataFusion plans a projection
# in time growing with the square of its width, before any deadline runs (6,000 took 1.8 s here,
# 15,000 took 21 s); 2,000, 0.2 s.
MAX_WIDTH = 2000


class GeneratesTooMuch(UnsafeStatement):
    """A statement that would make a value larger than its limits allow (``federation.sizes``)."""


class TooDeep(RecursionError):
    """A statement nesting deeper than the engine can plan safely."""


# sqlglot ends a -- comment at a bare \r, DataFusion only at \n: what follows it would be checked
# here and never run, while what the engine runs went unchecked.
_LONE_CARRIAGE_RETURN = re.compile(r"\r(?!\n)")
_LINE_COMMENT_END = re.compile(r"--[^\r\n]*(\r(?!\n))?")


def _between_tokens(sql: str) -> list[str] | None:
    """The text between ``sql``'s tokens (blanks and comments: never inside a quoted value or
    name); None when it cannot be split into tokens."""
    try:
        tokens = postgres_tokens(sql)
    except TokenError:
        return None
    gaps = zip([-1] + [token.end for token in tokens], [token.start for token in tokens] + [len(sql)])
    return [sql[after + 1:before] for after, before in gaps]


def _comment_ends_at_lone_carriage_return(sql: str) -> bool:
    """Whether a -- comment (outside quotes, as the gate splits the words) ends at a bare \r. A
    statement not even split into words may not hold a bare \r at all."""
    if "\r" not in sql:
        return False
    gaps = _between_tokens(sql)
    if gaps is None:
        return bool(_LONE_CARRIAGE_RETURN.search(sql))
    return any(match.group(1) for gap in gaps for match in _LINE_COMMENT_END.finditer(gap))


def _holds_executable_comment(sql: str) -> bool:
    """Whether a comment (outside quotes) is one that the engine runs as SQL: DataFusion's parser
    reads the text of a MySQL-style /*! ... */ as part of the statement, where the gate sees a
    comment. A statement not even split into words may not hold one anywhere."""
    if "/*" not in sql:
        return False
    gaps = _between_tokens(sql)
    if gaps is None:
        return bool(_EXECUTABLE_COMMENT.search(sql))
    return any(_EXECUTABLE_COMMENT.search(gap) for gap in gaps)


# What inside a `backquoted name` would make the gate's tokenizer, which knows no backquotes, read
# on differently from the engine's: a quote or dollar opening a text, a comment, an escape.
_MISREAD_IN_BACKQUOTES = re.compile(r"['\"$\\]|--|/\*|\*/")


def _backquoted_name_misread(sql: str) -> bool:
    """Whether a `backquoted name` (a name to DataFusion, loose characters to the gate) holds
    something the gate would read on from as code, a text or a comment, so that the two would
    check and run different statements. A statement the gate cannot even split may hold no
    backquote at all."""
    if "`" not in sql:
        return False
    try:
        tokens = postgres_tokens(sql)
    except TokenError:
        return True
    closed = -1  # where the last backquoted name ended
    for token in tokens:
        if token.token_type != TokenType.UNKNOWN or token.text != "`" or token.start <= closed:
            continue
        closed = sql.find("`", token.start + 1)
        if closed < 0:
            return False  # unterminated: the engine refuses it
        if _MISREAD_IN_BACKQUOTES.search(sql, token.start + 1, closed):
            return True
    return False


def check_read_only(sql: str) -> None:
    """Raise UnsafeStatement unless ``sql`` is exactly one read statement."""
    if _backquoted_name_misread(sql):
        raise NotAStatement("syntax error: a `backquoted` name holding a quote, a $, a backslash or a comment mark, "
                            "which the gate and the engine would read differently: name it in double quotes")
    if _comment_ends_at_lone_carriage_return(sql):
        raise NotAStatement("syntax error: a -- comment ended by a carriage return without a line feed (end "
                            "lines with \\n): the gate and the engine would read it differently, one ending the "
                            "comment there and the other not")
    if _holds_executable_comment(sql):
        raise NotAStatement("syntax error: a /*! ... */ comment, which the engine would run as part of the statement "
                            "while the gate reads it as a comment: write its text outside the comment, or drop the !")
    words = _leading_words(sql)
    if not words:
        raise UnsafeStatement("empty statement: send one SELECT, WITH, EXPLAIN, SHOW or DESCRIBE")
    head = words[0]
    if head in WRITE_STATEMENTS:
        raise UnsafeStatement(
            f"{head} statements are not allowed: flightdeck is read-only "
            "(a statement must start with SELECT, WITH, VALUES, EXPLAIN, SHOW or DESCRIBE)")
    if head not in READ_STATEMENTS and head != "(":
        raise NotAStatement(
            f"syntax error: no statement starts with {head[:40]!r} "
            "(a statement must start with SELECT, WITH, VALUES, EXPLAIN, SHOW or DESCRIBE)")
    if _statement_count(sql) > 1:
        raise UnsafeStatement("only one statement per request is allowed")
    if head in ("DESCRIBE", "DESC"):
        described = _described_statement(sql)
        if described is not None:  # DESCRIBE <query> plans the query: it passes the same checks
            check_read_only(described)
        return
    if head == "SHOW":
        return
    try:
        _check_statement(_strip_explain(sql) if head == "EXPLAIN" else sql)
    except TooLarge as error:
        raise GeneratesTooMuch(str(error)) from None
    except Unreadable as error:
        raise NotAStatement(str(error)) from None


_QUERY_HEADS = ("SELECT", "WITH", "VALUES", "(")


def _described_statement(sql: str) -> str | None:
    """The query a DESCRIBE describes (``DESCRIBE [VERBOSE | QUERY PLAN | ...] SELECT ...``), or
    None when it describes a table (``DESCRIBE orders``, ``DESCRIBE public."select"``)."""
    try:
        tokens = postgres_tokens(sql)
    except TokenError:
        return None
    rest = tokens[1:]
    names = all(token.text == "." if at % 2 else token.token_type in (TokenType.VAR, TokenType.IDENTIFIER)
                or _WORD.fullmatch(token.text) for at, token in enumerate(rest))
    if rest and names and len(rest) % 2:
        return None
    start = next((token for token in rest if token.token_type != TokenType.IDENTIFIER
                  and token.text.upper() in _QUERY_HEADS + ("DESCRIBE", "DESC", "EXPLAIN")), None)
    if start is None or start.text.upper() in ("DESCRIBE", "DESC", "EXPLAIN"):
        raise NotAStatement("syntax error: DESCRIBE takes a table's name or a query (SELECT, WITH or VALUES)")
    return sql[start.start:]


_WORD = re.compile(r"\w+")


def _check_statement(body: str) -> None:
    try:
        tree = parse_postgres(body)
    except (ParseError, TokenError):  # the engine parses it under read-only options
        check_unread(body)
        return
    _check_tree(tree)
    _check_widths(tree)
    _check_expansion(tree)
    _check_grouping_sets(tree)
    try:
        check_sizes(tree)
    except (TooLarge, RecursionError):
        raise
    except Exception as error:  # a statement whose values the gate cannot bound does not run unbounded
        log.warning("the size bound failed on a statement: %r", error)
        raise TooLarge("the gate cannot bound the values this statement makes: write it more simply") from None


def _leading_words(sql: str) -> list[str]:
    try:
        tokens = postgres_tokens(sql)
    except TokenError:
        return sql.strip().split()[:1]
    return [t.text.upper() for t in tokens[:4]]


def _statement_count(sql: str) -> int:
    try:
        tokens = postgres_tokens(sql)
    except TokenError:
        return 1
    count, seen_text = 0, False
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            count += seen_text
            seen_text = False
        else:
            seen_text = True
    return count + seen_text


_EXPLAIN_WORDS = {"ANALYZE", "VERBOSE"}
_QUERY_STARTS = {"SELECT", "WITH", "VALUES", "("}


def explain_parts(sql: str) -> tuple[str, str, frozenset[str]] | None:
    """For an EXPLAIN: its head with the options (``ANALYZE``, ``VERBOSE``, ``FORMAT x`` or a
    parenthesised list), the statement it explains, and the options' words; None for any other
    statement."""
    if "EXPLAIN" not in sql.upper():
        return None
    try:
        tokens = postgres_tokens(sql)
    except TokenError:
        return None
    if not tokens or tokens[0].text.upper() != "EXPLAIN":
        return None
    after = tokens[0].end + 1
    try:  # sqlglot reads EXPLAIN as a command holding the rest as one string: read the rest alone
        rest = postgres_tokens(sql[after:])
    except TokenError:
        raise NotAStatement("syntax error: EXPLAIN takes a query") from None
    at, options = 0, set()
    while at < len(rest):
        word = rest[at].text.upper()
        if word in _EXPLAIN_WORDS:
            at, options = at + 1, options | {word}
        elif word == "FORMAT":
            at, options = at + 2, options | {word}
        elif word == "(" and at + 1 < len(rest) and rest[at + 1].text.upper() not in _QUERY_STARTS:
            closing = closing_parentheses(rest).get(at, len(rest) - 1) + 1
            at, options = closing, options | _listed_options(rest[at + 1:closing - 1])
        else:
            break
    start = after + rest[at].start if at < len(rest) else len(sql)
    return sql[:start], sql[start:], frozenset(options)


def _strip_explain(sql: str) -> str:
    """The statement an EXPLAIN explains, refused unless it is a query."""
    parts = explain_parts(sql)
    if parts is None:  # not split into words: an unterminated quote or comment
        raise NotAStatement("syntax error: EXPLAIN takes a query, and this one cannot be read (an unterminated "
                            "quote or comment?)")
    _, inner, _ = parts
    head = (_leading_words(inner) or [""])[0]
    if head in WRITE_STATEMENTS:
        raise UnsafeStatement("EXPLAIN of a write statement is not allowed: flightdeck is read-only")
    if head not in READ_STATEMENTS + ("(",):
        raise NotAStatement(f"syntax error: EXPLAIN takes a query, and no query starts with {head[:40]!r}")
    return inner


def _listed_options(tokens: list) -> set[str]:
    """The options a parenthesised EXPLAIN list turns on: ``(ANALYZE, FORMAT tree)`` gives
    ANALYZE and FORMAT; ``(ANALYZE false)`` gives nothing."""
    options, item = set(), []
    for token in [*tokens, None]:
        if token is None or token.text == ",":
            if item and (len(item) == 1 or item[1] not in ("FALSE", "OFF", "0")):
                options.add(item[0])
            item = []
        else:
            item.append(token.text.upper())
    return options


def _check_depth(tree: exp.Expression) -> None:
    pending = [(tree, 1)]
    while pending:  # not recursive: the tree may be deeper than Python's recursion limit
        node, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise TooDeep(f"more than {MAX_DEPTH} levels")
        pending.extend((child, depth + 1) for child in node.iter_expressions())


def _check_expansion(tree: exp.Expression) -> None:
    """Refuse a statement whose CTEs, each planned again wherever it is read, add up to more than
    MAX_EXPANDED plannings, or, inlined wherever they are read, to more than MAX_EXPANDED_NODES
    parts beyond the statement's own: a chain of CTEs each reading the one before twice doubles
    the plan at every step (25 such CTEs would take the planner an hour, before any limit of the
    query holds), and a wide one read 128 times took 27 s and 390 MB to plan."""
    ctes = _ctes_inner_first(tree)
    if not ctes:
        return
    plannings: dict[str, int] = {}
    nodes: dict[str, int] = {}
    own = _size(tree)  # a CTE read once is inlined at no cost: its body is part of the statement
    most = own + MAX_EXPANDED_NODES
    for cte in ctes:
        name = cte.alias_or_name.lower()
        read = _names_read(cte.this, name)
        plannings[name] = max(plannings.get(name, 0), 1 + _weight(read, plannings, MAX_EXPANDED))
        nodes[name] = max(nodes.get(name, 0), _size(cte.this) + _weight(read, nodes, most))
    read = _names_read(tree, None)
    if 1 + _weight(read, plannings, MAX_EXPANDED) > MAX_EXPANDED:
        raise GeneratesTooMuch(f"the statement's CTEs would be planned more than {MAX_EXPANDED:,} times (each is "
                               "planned again wherever it is read): read each CTE in fewer places")
    if _weight(read, nodes, most) > most:
        raise GeneratesTooMuch(f"the statement's CTEs, planned again wherever they are read, would add more than "
                               f"{MAX_EXPANDED_NODES:,} parts to its plan: read each CTE in fewer places")


def _size(node: exp.Expression) -> int:
    """How many parts (columns, values, operators...) a statement's tree has."""
    return sum(1 for _ in node.walk())


def _ctes_inner_first(tree: exp.Expression) -> list[exp.CTE]:
    """The statement's CTEs, each after the CTEs defined inside it and after its earlier siblings:
    the order in which each can be weighed once, knowing the weight of everything it reads."""
    ordered, pending = [], [(tree, False)]
    while pending:  # not recursive: the tree may be deeper than Python's recursion limit
        node, children_done = pending.pop()
        if children_done:
            if isinstance(node, exp.CTE):
                ordered.append(node)
            continue
        pending.append((node, True))
        pending.extend((child, False) for child in reversed(list(node.iter_expressions())))
    return ordered


def _check_grouping_sets(tree: exp.Expression) -> None:
    """Refuse a GROUP BY of more than MAX_GROUPING_SETS grouping sets: the engine plans each one
    (a CUBE of n columns is 2**n of them), all while planning, outside the memory pool."""
    for group in tree.find_all(exp.Group):
        sets = 1
        for part in group.expressions:
            if isinstance(part, exp.Cube):
                sets *= 2 ** min(len(part.expressions), 64)
            elif isinstance(part, exp.Rollup):
                sets *= len(part.expressions) + 1
            elif isinstance(part, exp.GroupingSets):
                sets *= max(1, len(part.expressions))
        if sets > MAX_GROUPING_SETS:
            raise GeneratesTooMuch(f"the GROUP BY makes {sets:,} grouping sets (a CUBE of n columns makes 2^n, a "
                                   f"ROLLUP n + 1); at most {MAX_GROUPING_SETS:,}")


def _names_read(node: exp.Expression, itself: str | None) -> list[str]:
    """The names of the tables ``node`` reads that a CTE may stand for, once per reading (not
    those read inside the CTEs defined in it, nor a recursive CTE's reading of ``itself``)."""
    return [table.name.lower()
            for table in node.walk(bfs=False, prune=lambda inner: isinstance(inner, exp.CTE) and inner is not node)
            if isinstance(table, exp.Table) and not table.args.get("db") and table.name.lower() != itself]


def _weight(names: list[str], weights: dict[str, int], ceiling: int) -> int:
    """What the CTE bodies ``names`` stand for weigh together, once inlined; counted up to just
    past ``ceiling``."""
    return min(sum(weights.get(name, 0) for name in names), ceiling + 1)


def _check_tree(tree: exp.Expression, paths: bool = True) -> None:
    _check_depth(tree)
    for node in tree.walk():
        if isinstance(node, _WRITE_NODES):
            what = _NODE_NAMES.get(type(node), type(node).__name__.upper())
            raise UnsafeStatement(f"{what} is not allowed: flightdeck is read-only")
        name = call_name(node)
        if name in FILE_READING_FUNCTIONS:
            raise UnsafeStatement(
                f"{name}() is not allowed: SQL reaches files and networks only through "
                "configured datasets")
        if name in SIDE_EFFECT_FUNCTIONS:
            raise UnsafeStatement(f"{name}() is not allowed: flightdeck is read-only")
        if paths and isinstance(node, exp.Table) and _looks_like_path(node):
            raise UnsafeStatement(
                f"reading '{node.name}' directly is not allowed: query a configured dataset")


def _check_widths(tree: exp.Expression) -> None:
    ctes = {cte.alias_or_name: cte.this for cte in tree.find_all(exp.CTE)}
    for select in tree.find_all(exp.Select):
        width = _width(select, ctes, set())
        if width > MAX_WIDTH:
            raise TooLarge(f"a SELECT makes {width:,} columns (its expressions, and those a * stands for of the "
                           f"subqueries, CTEs and VALUES it reads); at most {MAX_WIDTH:,} (planning takes time "
                           "growing with the square of their number)")
    for values in tree.find_all(exp.Values):
        widest = _width(values, ctes, set())
        if widest > MAX_WIDTH:
            raise TooLarge(f"a row of VALUES holds {widest:,} values; at most {MAX_WIDTH:,} (planning takes time "
                           "growing with the square of their number)")


def _width(query: exp.Expression, ctes: dict[str, exp.Expression], reading: set[str]) -> int:
    """How many columns a query makes, as far as the statement tells: a * counts the columns of
    the subqueries, CTEs and VALUES it reads (a table's are not known here, and count nothing)."""
    if isinstance(query, exp.SetOperation):
        return _width(query.left, ctes, reading)
    if isinstance(query, (exp.Subquery, exp.Paren)):
        return _width(query.this, ctes, reading)
    if isinstance(query, exp.Values):
        return max((len(row.expressions) for row in query.expressions if isinstance(row, exp.Tuple)), default=0)
    if isinstance(query, exp.Table) and query.name in ctes and query.name not in reading:
        return _width(ctes[query.name], ctes, reading | {query.name})
    if not isinstance(query, exp.Select):
        return 0
    stars = [e for e in query.expressions if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and e.is_star)]
    width = len(query.expressions) - len(stars)
    sources = [query.args["from_"].this] if query.args.get("from_") else []
    sources += [join.this for join in query.args.get("joins") or []]
    for star in stars:  # t.* stands for t's columns, * for every source's
        qualifier = star.table if isinstance(star, exp.Column) else ""
        width += sum(_width(source, ctes, reading) for source in sources
                     if not qualifier or source.alias_or_name == qualifier)
    return width


def _looks_like_path(table: exp.Table) -> bool:
    # DuckDB's replacement scans turn FROM 'file.csv' into a file read.
    this = table.this
    if not (isinstance(this, exp.Identifier) and this.quoted):
        return False
    return "/" in this.name or "\\" in this.name or bool(_FILE_SUFFIX.search(this.name))


_FILE_SUFFIX = re.compile(r"\.(csv|tsv|parquet|json|ndjson|jsonl|txt|db|duckdb|sqlite|arrow|gz|zst)$",
                          re.IGNORECASE)


# MySQL and MariaDB run the text of /*! ... */ and /*M! ... */ comments as SQL.
_EXECUTABLE_COMMENT = re.compile(r"/\*M?!")


@functools.lru_cache(maxsize=1024)  # a kept plan sends the same text again and again
def check_backend_select(sql: str, dialect: str, param_style: str) -> None:
    """Raise UnsafeStatement unless ``sql`` is exactly one plain SELECT in the backend's
    ``dialect``: what a connector sends is always one, and a read-only session would still
    run a COPY TO, an INTO OUTFILE, a SET back to read-write or a lock. Only statements that
    pass are remembered: a refused one raises every time."""
    if dialect == "mysql" and _EXECUTABLE_COMMENT.search(sql):
        raise UnsafeStatement("an executable comment (/*! ... */) is not sent to MySQL")
    text = sql.replace("%%", "%").replace("%s", "?") if param_style == "format" else sql
    try:
        trees = sqlglot.parse(text, read=dialect)
    except (ParseError, TokenError):
        raise UnsafeStatement("the statement cannot be read as one SELECT") from None
    if len(trees) != 1 or not isinstance(trees[0], exp.Select):
        kinds = ", ".join(type(tree).__name__.upper() for tree in trees if tree is not None) or "nothing"
        raise UnsafeStatement(f"only one SELECT is sent, not {kinds}")
    _check_tree(trees[0], paths=False)
