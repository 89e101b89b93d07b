"""Models as SQL functions: ``embed`` and ``predict``, installed into the engine by the Stack.

    SELECT path, embed(content) FROM guides                  -- FixedSizeList<float32, 384>
    SELECT embed(?, 'minilm_int8')                           -- a model named in `embeddings:`
    SELECT path FROM guides
      ORDER BY cosine_distance(embed(content), embed('too many connections')) LIMIT 1
    SELECT id, predict('churn', tenure, spend, tickets) FROM customers   -- a model in `models:`

A Python UDF in datafusion-python 55 has one fixed signature (exact argument types; registering
the same name again replaces the function), and an embedding's type carries its dimension,
which differs per model. So each model gets its own UDF, registered the first time a statement
uses it (that is also when the model loads: nothing happens at startup), and each call is
rewritten on the statement's tokens before DataFusion plans it:

    embed(x)            -> "embed:<default>"(x, arrow_typeof(x))
    embed(x, 'm')       -> "embed:m"(x, arrow_typeof(x))
    predict('m', a, b)  -> "predict:m"(a, b)

Only the call's own text changes (comments, quoting and everything else stay as written), and
a call that is a whole select item is aliased by its own text, so the column is still named
``embed(content)``. The rewrite is where a bad call is refused with a precise message: an
unknown model (the known ones are listed), a model name that is not a string literal, a wrong
argument count. ``arrow_typeof(x)`` is there because DataFusion casts any argument to the
text type a UDF declares (42 -> '42', a vector -> '[0.1, ...]'); told the argument's own type,
the UDF refuses what is not text.

The UDFs get one Arrow array per batch and return the model's Arrow array
(TextEmbedder.embed / TabularModel.predict): no Python object per row. They are immutable, so
DataFusion folds ``embed('constant')`` into a literal while planning rather than per row (the
last 256 single texts per model are remembered: the optimizer runs more than once per query).

``cosine_distance(a, b)`` is DataFusion's own (native, FixedSizeList or List of floats, either
side may be a constant, NULL for a zero vector): nothing to register.
"""
from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from datafusion import udf
from sqlglot.errors import TokenError
from sqlglot.tokens import Token, TokenType

from federation.engine import QueryEngine, QueryError
from federation.tokens import postgres_tokens
from flightdeck.config import LoadedConfig
from inference.embedder import TextEmbedder
from inference.errors import ModelError
from inference.query_cache import QueryVectorCache
from inference.registry import ModelRegistry
from inference.tabular import TabularModel

# Always available unless `embeddings:` names its own `minilm`: the bundled all-MiniLM-L6-v2, fp32.
BUNDLED_EMBEDDING = {"name": "minilm", "from": "minilm"}
ONE_TEXT_CACHE_SIZE = 256  # single embed() texts remembered per model

_MENTION = re.compile(r"\b(embed|predict)\s*\(", re.IGNORECASE)
# arrow_typeof() names of the types embed() takes (Null: a NULL literal or unbound parameter).
_TEXT_TYPES = re.compile(r"^(Null|Utf8|LargeUtf8|Utf8View|Dictionary\(\w+, (Utf8|LargeUtf8|Utf8View)\))$")
_ITEM_STARTS = {TokenType.SELECT, TokenType.DISTINCT, TokenType.ALL, TokenType.COMMA}
_ITEM_ENDS = {TokenType.COMMA, TokenType.FROM, TokenType.R_PAREN, TokenType.SEMICOLON, TokenType.UNION,
              TokenType.EXCEPT, TokenType.INTERSECT, TokenType.ORDER_BY, TokenType.LIMIT, TokenType.WHERE,
              TokenType.GROUP_BY, TokenType.HAVING}
_CLAUSES = {TokenType.SELECT, TokenType.FROM, TokenType.JOIN, TokenType.WHERE, TokenType.GROUP_BY,
            TokenType.HAVING, TokenType.ORDER_BY, TokenType.LIMIT, TokenType.ON, TokenType.UNION,
            TokenType.EXCEPT, TokenType.INTERSECT, TokenType.WINDOW, TokenType.QUALIFY}

EMBED_USAGE = "embed(text) or embed(text, 'model')"
PREDICT_USAGE = "predict('model', feature, ...)"


def model_registry(loaded: LoadedConfig) -> ModelRegistry:
    """The config's models; the model cache (converted ONNX files) is `<data_dir>/models`."""
    config = loaded.config
    embeddings = [e.registry_entry() for e in config.embeddings or []]
    if not any(e["name"] == BUNDLED_EMBEDDING["name"] for e in embeddings):
        embeddings.append(dict(BUNDLED_EMBEDDING))
    return ModelRegistry(embeddings, [m.registry_entry() for m in config.models],
                         base_dir=loaded.base_dir, cache_dir=loaded.data_dir / "models")


@dataclass
class _Call:
    function: str            # "embed" | "predict"
    start: int               # token index of the name
    end: int                 # token index of the closing parenthesis
    args: list[tuple[int, int]]  # token ranges [lo, hi) of the arguments


class ModelFunctions:
    """embed() and predict() for one engine; `install` adds the rewrite that resolves them."""

    def __init__(self, registry: ModelRegistry, default_embedding: str | None = None):
        self.registry = registry
        names = registry.embedding_names
        # embed(text) uses the first model listed under `embeddings:` (minilm when none is).
        self.default_embedding = default_embedding or (names[0] if names else None)
        # Weak references: each engine holds this object's rewrite. The per-model UDFs made so
        # far are registered in every engine (an engine made later gets them at install).
        self._engines: list[weakref.ref] = []
        self._udfs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def install(self, engine: QueryEngine) -> "ModelFunctions":
        with self._lock:
            self._engines.append(weakref.ref(engine))
            for function in self._udfs.values():
                engine.register_udf(function)
        engine.add_rewriter(self.rewrite)
        return self

    # ------------------------------------------------------------------ the rewrite

    def rewrite(self, sql: str) -> str:
        if not _MENTION.search(sql):
            return sql
        try:
            tokens = postgres_tokens(sql)
        except TokenError:
            return sql  # DataFusion reports what is wrong with the statement
        if not tokens:
            return sql
        if tokens[0].token_type == TokenType.COMMAND:  # EXPLAIN: sqlglot keeps the rest as one string
            return sql[:tokens[0].end + 1] + self.rewrite(sql[tokens[0].end + 1:])
        return (sql[:tokens[0].start] + _Rewriter(self, sql, tokens).render(0, len(tokens))
                + sql[tokens[-1].end + 1:])

    def embed_call(self, args: list[str], literals: list[str | None]) -> str:
        if len(args) not in (1, 2):
            raise QueryError(f"embed() takes 1 or 2 arguments, {EMBED_USAGE}; got {len(args)}")
        if _quote("embed:")[:-1] in args[0]:  # its rewrite writes the argument twice: nested, 2^depth times
            raise QueryError("embed() cannot take another embed() inside its argument")
        if len(args) == 2:
            model = literals[1]
            if model is None:
                raise QueryError(f"embed(): the model must be a string literal, as in {EMBED_USAGE}; "
                                 f"known models: {', '.join(self.registry.embedding_names)}")
        else:
            model = self.default_embedding
            if model is None:
                raise QueryError("embed(): no embedding model is configured (config key `embeddings`)")
        name = self._embedding_function(model)
        return f'{_quote(name)}({args[0]}, arrow_typeof({args[0]}))'

    def predict_call(self, args: list[str], literals: list[str | None]) -> str:
        if not args or literals[0] is None:
            raise QueryError(f"predict() takes the model's name as a string literal first, {PREDICT_USAGE}; "
                             f"known models: {', '.join(self.registry.model_names) or 'none are configured'}")
        if len(args) == 1:
            raise QueryError(f"predict('{literals[0]}'): no feature arguments; use {PREDICT_USAGE}")
        name = self._model_function(literals[0], len(args) - 1)
        return f"{_quote(name)}({', '.join(args[1:])})"

    # ------------------------------------------------------------------ per-model UDFs

    def _embedding_function(self, model: str) -> str:
        name = f"embed:{model}"
        if name in self._udfs:
            return name
        embedder = _loaded(lambda: self.registry.embedder(model), "embed")
        self._register(name, lambda: udf(_embed_function(embedder), [pa.string(), pa.string()], embedder.type,
                                         "immutable", name=name))
        return name

    def _model_function(self, model_name: str, count: int) -> str:
        model = _loaded(lambda: self.registry.model(model_name), "predict")
        inputs = model.input_names
        expected = model.n_features if len(inputs) == 1 else len(inputs)
        if expected is None or count == expected:
            types = [pa.float64()] * count  # DataFusion casts integer, float and decimal columns
        elif count == 1 and len(inputs) == 1:
            types = [pa.list_(pa.float32(), expected)]  # one feature-vector column, e.g. embed(...)
        else:
            vector = f", or one array of {expected} values" if len(inputs) == 1 else ""
            raise QueryError(f"predict('{model_name}', ...) takes {expected} feature arguments{vector}; "
                             f"got {count}")
        name = f"predict:{model_name}" + ("" if count == expected else f"/{count}")
        if name not in self._udfs:
            try:  # the output's Arrow type: what the model returns for zero rows
                output = model.predict([pa.array([], t) for t in types]).type
            except ModelError as error:
                raise QueryError(f"predict('{model_name}'): {error}") from None
            self._register(name, lambda: udf(_predict_function(model), types, output, "immutable", name=name))
        return name

    def _register(self, name: str, make) -> None:
        with self._lock:
            if name not in self._udfs:
                function = make()
                for engine in filter(None, (ref() for ref in self._engines)):
                    engine.register_udf(function)
                self._udfs[name] = function


class _Rewriter:
    """One statement's tokens; `render` gives the text of a token range with calls rewritten."""

    def __init__(self, functions: ModelFunctions, sql: str, tokens: list[Token]):
        self.functions, self.sql, self.tokens = functions, sql, tokens
        self.in_select = _select_list_positions(tokens)

    def render(self, lo: int, hi: int) -> str:
        if lo >= hi:
            return ""
        out, position, index = [], self.tokens[lo].start, lo
        while index < hi:
            call = self._call_at(index, hi)
            if call is None:
                index += 1
                continue
            out.append(self.sql[position:self.tokens[index].start])
            out.append(self._rewritten(call))
            position = self.tokens[call.end].end + 1
            index = call.end + 1
        out.append(self.sql[position:self.tokens[hi - 1].end + 1])
        return "".join(out)

    def _call_at(self, index: int, hi: int) -> _Call | None:
        tokens = self.tokens
        token = tokens[index]
        function = token.text.lower()
        if (token.token_type != TokenType.VAR or function not in ("embed", "predict") or index + 1 >= hi
                or tokens[index + 1].token_type != TokenType.L_PAREN
                or (index and tokens[index - 1].token_type == TokenType.DOT)):
            return None
        depth, args, arg_start = 0, [], index + 2
        for position in range(index + 1, hi):
            kind = tokens[position].token_type
            if kind == TokenType.L_PAREN:
                depth += 1
            elif kind == TokenType.R_PAREN:
                depth -= 1
                if depth == 0:
                    if position > arg_start or args:
                        args.append((arg_start, position))
                    return _Call(function, index, position, args)
            elif kind == TokenType.COMMA and depth == 1:
                args.append((arg_start, position))
                arg_start = position + 1
        return None  # unbalanced: DataFusion reports it

    def _rewritten(self, call: _Call) -> str:
        args = [self.render(lo, hi) for lo, hi in call.args]
        literals = [self.tokens[lo].text if hi - lo == 1 and self.tokens[lo].token_type == TokenType.STRING
                    else None for lo, hi in call.args]
        if call.function == "embed":
            text = self.functions.embed_call(args, literals)
        else:
            text = self.functions.predict_call(args, literals)
        if self._whole_select_item(call):
            original = self.sql[self.tokens[call.start].start:self.tokens[call.end].end + 1]
            text += f" AS {_quote(original)}"
        return text

    def _whole_select_item(self, call: _Call) -> bool:
        tokens = self.tokens
        before = tokens[call.start - 1].token_type if call.start else None
        after = tokens[call.end + 1].token_type if call.end + 1 < len(tokens) else None
        return (self.in_select[call.start] and before in _ITEM_STARTS
                and (after is None or after in _ITEM_ENDS))


def _select_list_positions(tokens: list[Token]) -> list[bool]:
    """For each token, whether it sits directly in a SELECT list (not inside parentheses there)."""
    clause = [None]
    positions = []
    for token in tokens:
        kind = token.token_type
        if kind == TokenType.R_PAREN and len(clause) > 1:
            clause.pop()
        elif kind in _CLAUSES:
            clause[-1] = kind
        positions.append(clause[-1] == TokenType.SELECT)
        if kind == TokenType.L_PAREN:
            clause.append(None)
    return positions


def _embed_function(embedder: TextEmbedder):
    # DataFusion evaluates embed('constant') each time it optimizes the plan (planning, pushdown
    # checks, execution): single texts are remembered so a query text is embedded once.
    remembered = QueryVectorCache(ONE_TEXT_CACHE_SIZE)

    def one(text: str) -> pa.Array:
        return remembered.vector("", text, lambda t: embedder.embed(pa.array([t], pa.string())))

    def embed(texts: pa.Array, types: pa.Array) -> pa.Array:
        if len(types):
            kind = types[0].as_py()
            if not _TEXT_TYPES.match(kind or ""):
                raise QueryError(f"embed() takes text, got {kind}; cast it first if its text is meant, "
                                 "e.g. embed(CAST(x AS VARCHAR))")
        if len(texts) == 1 and texts.null_count == 0:
            return one(texts[0].as_py())
        return embedder.embed(texts)
    return embed


def _predict_function(model: TabularModel):
    def predict(*columns: pa.Array) -> pa.Array:
        return model.predict(list(columns))
    return predict


def _loaded(load, function: str):
    try:
        return load()
    except ModelError as error:
        raise QueryError(f"{function}(): {error}") from None


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
