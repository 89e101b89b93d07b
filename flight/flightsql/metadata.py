"""Flight SQL metadata results: schemas as the protocol defines them, and their rows."""
from __future__ import annotations

import re

import pyarrow as pa

from flightdeck.service import PrimaryKey, TableEntry

# ---- result schemas (names, order and nullability are the protocol's) ----

SQL_INFO_VALUE = pa.dense_union([
    pa.field("string_value", pa.string(), nullable=False),
    pa.field("bool_value", pa.bool_(), nullable=False),
    pa.field("bigint_value", pa.int64(), nullable=False),
    pa.field("int32_bitmask", pa.int32(), nullable=False),
    pa.field("string_list", pa.list_(pa.string()), nullable=False),
    pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.int32())), nullable=False),
])
SQL_INFO_SCHEMA = pa.schema([
    pa.field("info_name", pa.uint32(), nullable=False),
    pa.field("value", SQL_INFO_VALUE, nullable=False),
])
CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.string(), nullable=False)])
DB_SCHEMAS_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.string()),
    pa.field("db_schema_name", pa.string(), nullable=False),
])
TABLES_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.string()),
    pa.field("db_schema_name", pa.string()),
    pa.field("table_name", pa.string(), nullable=False),
    pa.field("table_type", pa.string(), nullable=False),
])
TABLES_WITH_SCHEMA_SCHEMA = TABLES_SCHEMA.append(pa.field("table_schema", pa.binary(), nullable=False))
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.string(), nullable=False)])
PRIMARY_KEYS_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.string()),
    pa.field("db_schema_name", pa.string()),
    pa.field("table_name", pa.string(), nullable=False),
    pa.field("column_name", pa.string(), nullable=False),
    pa.field("key_sequence", pa.int32(), nullable=False),
    pa.field("key_name", pa.string()),
])
_KEY_FIELDS = [
    ("pk_catalog_name", pa.string(), True), ("pk_db_schema_name", pa.string(), True),
    ("pk_table_name", pa.string(), False), ("pk_column_name", pa.string(), False),
    ("fk_catalog_name", pa.string(), True), ("fk_db_schema_name", pa.string(), True),
    ("fk_table_name", pa.string(), False), ("fk_column_name", pa.string(), False),
    ("key_sequence", pa.int32(), False), ("fk_key_name", pa.string(), True),
    ("pk_key_name", pa.string(), True), ("update_rule", pa.uint8(), False),
    ("delete_rule", pa.uint8(), False),
]
FOREIGN_KEYS_SCHEMA = pa.schema([pa.field(n, t, nullable=null) for n, t, null in _KEY_FIELDS])
XDBC_TYPE_INFO_SCHEMA = pa.schema([
    pa.field("type_name", pa.string(), nullable=False),
    pa.field("data_type", pa.int32(), nullable=False),
    pa.field("column_size", pa.int32()),
    pa.field("literal_prefix", pa.string()),
    pa.field("literal_suffix", pa.string()),
    pa.field("create_params", pa.list_(pa.field("item", pa.string(), nullable=False))),
    pa.field("nullable", pa.int32(), nullable=False),
    pa.field("case_sensitive", pa.bool_(), nullable=False),
    pa.field("searchable", pa.int32(), nullable=False),
    pa.field("unsigned_attribute", pa.bool_()),
    pa.field("fixed_prec_scale", pa.bool_(), nullable=False),
    pa.field("auto_increment", pa.bool_()),
    pa.field("local_type_name", pa.string()),
    pa.field("minimum_scale", pa.int32()),
    pa.field("maximum_scale", pa.int32()),
    pa.field("sql_data_type", pa.int32(), nullable=False),
    pa.field("datetime_subcode", pa.int32()),
    pa.field("num_prec_radix", pa.int32()),
    pa.field("interval_precision", pa.int32()),
])

TABLE_TYPES = ["TABLE", "VIEW", "SYSTEM TABLE"]


# ---- SqlInfo ----

def sql_info_values(server_version: str) -> dict[int, object]:
    """What flightdeck tells clients about itself, by SqlInfo number."""
    return {
        0: "flightdeck", 1: server_version, 2: pa.__version__,
        3: True,    # FLIGHT_SQL_SERVER_READ_ONLY
        4: True,    # FLIGHT_SQL_SERVER_SQL
        5: False,   # FLIGHT_SQL_SERVER_SUBSTRAIT
        8: _Int32(0),  # FLIGHT_SQL_SERVER_TRANSACTION: none
        9: True,    # FLIGHT_SQL_SERVER_CANCEL
        100: _Int32(0), 101: _Int32(0),  # statement / transaction timeouts: none
        500: False, 501: False, 502: False,  # no CREATE/DROP of catalogs, schemas, tables
        503: _Int32(3),  # identifiers fold to lowercase
        504: '"',
        505: _Int32(0),  # quoted identifier case: kept as written
        506: True,
        507: _Int32(0),  # NULLs sort high
        508: ["SELECT", "FROM", "WHERE", "GROUP", "BY", "HAVING", "ORDER", "LIMIT", "OFFSET",
              "JOIN", "LEFT", "RIGHT", "FULL", "INNER", "OUTER", "CROSS", "ON", "USING", "WITH",
              "UNION", "INTERSECT", "EXCEPT", "DISTINCT", "EXPLAIN", "SHOW", "DESCRIBE"],
        509: ["abs", "ceil", "floor", "round", "trunc", "power", "sqrt", "exp", "ln", "log10",
              "log2", "sin", "cos", "tan", "pi", "random", "signum"],
        510: ["lower", "upper", "length", "char_length", "substr", "concat", "trim", "ltrim",
              "rtrim", "replace", "split_part", "starts_with", "strpos", "regexp_like",
              "regexp_replace", "left", "right", "lpad", "rpad"],
        511: ["coalesce", "nullif", "arrow_typeof", "version"],
        512: ["now", "current_date", "current_time", "date_trunc", "date_part", "extract",
              "to_timestamp", "date_bin", "to_char"],
        513: "\\", 514: "",
        515: True, 516: True, 518: True, 519: False, 520: True, 521: True,
        522: _Int32(0b11),   # GROUP BY unrelated and beyond select
        523: True, 524: True,
        525: _Int32(0b11),   # minimum and core grammar
        526: _Int32(0b1),    # ANSI-92 entry level
        527: False,
        528: _Int32(2),      # full outer joins
        529: "schema", 530: "procedure", 531: "catalog", 532: True,
        533: _Int32(0), 534: _Int32(0), 535: _Int32(0), 536: False, 537: False,
        538: _Int32(0b1111),  # subqueries in comparisons, EXISTS, IN, quantified
        539: True,
        540: _Int32(0b11),    # UNION and UNION ALL
        562: _Int32(0),       # default isolation: none
        563: False,           # no transactions
        564: _Int32(0),
        565: False, 566: False,
        567: _Int32(0b10),    # forward-only result sets
    }


class _Int32(int):
    """Marks a SqlInfo value that travels as int32_bitmask rather than bigint_value."""


def sql_info_table(requested: list[int], server_version: str) -> pa.Table:
    values = sql_info_values(server_version)
    names = [n for n in (requested or sorted(values)) if n in values]
    type_ids, offsets, children = [], [], [[] for _ in range(6)]
    for name in names:
        slot = _union_slot(values[name])
        type_ids.append(slot)
        offsets.append(len(children[slot]))
        children[slot].append(values[name])
    child_arrays = [pa.array(children[i], type=SQL_INFO_VALUE.field(i).type) for i in range(6)]
    # Built from buffers so the union keeps the protocol's exact (non-nullable) child fields.
    union = pa.Array.from_buffers(
        SQL_INFO_VALUE, len(names),
        [None, pa.array(type_ids, type=pa.int8()).buffers()[1],
         pa.array(offsets, type=pa.int32()).buffers()[1]],
        children=child_arrays)
    return pa.Table.from_arrays([pa.array(names, type=pa.uint32()), union], schema=SQL_INFO_SCHEMA)


def _union_slot(value: object) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, _Int32):
        return 3
    if isinstance(value, int):
        return 2
    if isinstance(value, str):
        return 0
    if isinstance(value, list):
        return 4
    return 5


# ---- catalog listings ----

def like_pattern(pattern: str | None) -> re.Pattern | None:
    """A Flight SQL filter pattern (% and _ wildcards, \\ escapes) as a regex."""
    if pattern is None:
        return None
    out, escaped = [], False
    for ch in pattern:
        if escaped:
            out.append(re.escape(ch))
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            out.append(".*")
        elif ch == "_":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return re.compile("^" + "".join(out) + "$", re.DOTALL)


def _matches(pattern: re.Pattern | None, value: str) -> bool:
    return pattern is None or bool(pattern.match(value))


def catalogs_table(catalog_name: str) -> pa.Table:
    return pa.Table.from_pylist([{"catalog_name": catalog_name}], schema=CATALOGS_SCHEMA)


def db_schemas_table(catalog_name: str, schema_names: list[str], catalog: str | None,
                     pattern: str | None) -> pa.Table:
    regex = like_pattern(pattern)
    rows = [] if catalog not in (None, catalog_name) else [
        {"catalog_name": catalog_name, "db_schema_name": name}
        for name in schema_names if _matches(regex, name)]
    return pa.Table.from_pylist(rows, schema=DB_SCHEMAS_SCHEMA)


def tables_table(catalog_name: str, entries: list[TableEntry], catalog: str | None,
                 schema_pattern: str | None, table_pattern: str | None, table_types: list[str],
                 include_schema: bool) -> pa.Table:
    schema_regex, table_regex = like_pattern(schema_pattern), like_pattern(table_pattern)
    rows = []
    wanted_types = {t.upper() for t in table_types}
    if catalog in (None, catalog_name):
        for entry in entries:
            if wanted_types and entry.table_type not in wanted_types:
                continue
            if not (_matches(schema_regex, entry.schema_name) and _matches(table_regex, entry.table_name)):
                continue
            row = {"catalog_name": catalog_name, "db_schema_name": entry.schema_name,
                   "table_name": entry.table_name, "table_type": entry.table_type}
            if include_schema:
                row["table_schema"] = entry.arrow_schema.serialize().to_pybytes()
            rows.append(row)
    schema = TABLES_WITH_SCHEMA_SCHEMA if include_schema else TABLES_SCHEMA
    return pa.Table.from_pylist(rows, schema=schema)


def table_types_table() -> pa.Table:
    return pa.Table.from_pylist([{"table_type": t} for t in sorted(TABLE_TYPES)],
                                schema=TABLE_TYPES_SCHEMA)


def primary_keys_table(catalog_name: str, keys: list[PrimaryKey], catalog: str | None) -> pa.Table:
    rows = [] if catalog not in (None, catalog_name) else [
        {"catalog_name": catalog_name, "db_schema_name": key.schema_name, "table_name": key.table_name,
         "column_name": column, "key_sequence": position, "key_name": None}
        for key in keys for position, column in enumerate(key.columns, start=1)]
    return pa.Table.from_pylist(rows, schema=PRIMARY_KEYS_SCHEMA)


def foreign_keys_table() -> pa.Table:
    """flightdeck datasets declare no foreign keys; the result is empty but well-formed."""
    return FOREIGN_KEYS_SCHEMA.empty_table()


# ---- XDBC type info: the types DataFusion's SQL accepts ----
# (type_name, data_type, column_size, prefix, suffix, case_sensitive, searchable,
#  unsigned, fixed_prec_scale, sql_data_type, datetime_subcode, num_prec_radix)
_XDBC_TYPES = [
    ("BOOLEAN", -7, 1, None, None, False, 2, None, False, -7, None, None),
    ("TINYINT", -6, 3, None, None, False, 2, False, True, -6, None, 10),
    ("BIGINT", -5, 19, None, None, False, 2, False, True, -5, None, 10),
    ("BYTEA", -3, None, "X'", "'", False, 2, None, False, -3, None, None),
    ("VARCHAR", 12, None, "'", "'", True, 3, None, False, 12, None, None),
    ("DECIMAL", 3, 38, None, None, False, 2, False, True, 3, None, 10),
    ("INTEGER", 4, 10, None, None, False, 2, False, True, 4, None, 10),
    ("SMALLINT", 5, 5, None, None, False, 2, False, True, 5, None, 10),
    ("REAL", 7, 24, None, None, False, 2, False, False, 7, None, 2),
    ("DOUBLE", 8, 53, None, None, False, 2, False, False, 8, None, 2),
    ("DATE", 91, 10, "DATE '", "'", False, 2, None, False, 9, 1, None),
    ("TIME", 92, 15, "TIME '", "'", False, 2, None, False, 9, 2, None),
    ("TIMESTAMP", 93, 26, "TIMESTAMP '", "'", False, 2, None, False, 9, 3, None),
]


def xdbc_type_info_table(data_type: int | None) -> pa.Table:
    rows = []
    for (name, code, size, prefix, suffix, case_sensitive, searchable, unsigned, fixed,
         sql_type, subcode, radix) in sorted(_XDBC_TYPES, key=lambda r: (r[1], r[0])):
        if data_type is not None and code != data_type:
            continue
        rows.append({
            "type_name": name, "data_type": code, "column_size": size, "literal_prefix": prefix,
            "literal_suffix": suffix, "create_params": ["precision", "scale"] if name == "DECIMAL" else None,
            "nullable": 1, "case_sensitive": case_sensitive, "searchable": searchable,
            "unsigned_attribute": unsigned, "fixed_prec_scale": fixed, "auto_increment": False,
            "local_type_name": name, "minimum_scale": 0 if name == "DECIMAL" else None,
            "maximum_scale": 38 if name == "DECIMAL" else None, "sql_data_type": sql_type,
            "datetime_subcode": subcode, "num_prec_radix": radix, "interval_precision": None})
    return pa.Table.from_pylist(rows, schema=XDBC_TYPE_INFO_SCHEMA)
