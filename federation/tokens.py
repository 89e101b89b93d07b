"""A statement's words as sqlglot's PostgreSQL tokenizer splits them, split once per text.

The gate, the placeholder rewriting, the table-function arguments, the search and model
rewriters and the parsers of the gate and of pushdown each read a statement's tokens, mostly of
the same text: tokenizing is the costliest
step of all that (0.4 s for a 100,000-value IN list), so the last texts' tokens are kept. They
are weighed by the text's length (about 64 bytes of tokens per character), so a few large
statements cannot make the cache hold much; one longer than the whole cache is not kept.
"""
from __future__ import annotations

import threading

import cachetools
import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import Token

CACHED_CHARACTERS = 1_000_000  # about 64 MB of tokens at most

_cache: cachetools.LRUCache = cachetools.LRUCache(maxsize=CACHED_CHARACTERS, getsizeof=lambda kept: kept[0])


@cachetools.cached(_cache, key=lambda sql: sql, lock=threading.Lock())
def _tokenized(sql: str) -> tuple[int, tuple[Token, ...] | str]:
    """The text's length (its weight in the cache) and its tokens, or the tokenizer's error
    message (a text that cannot be split is not split again)."""
    try:
        return len(sql), tuple(sqlglot.tokenize(sql, read="postgres"))
    except TokenError as error:
        return len(sql), str(error)


def postgres_tokens(sql: str) -> list[Token]:
    """``sql``'s tokens (a new list; the tokens themselves are shared and must not be changed).
    Raises TokenError as sqlglot does for a text it cannot split."""
    _, tokens = _tokenized(sql)
    if isinstance(tokens, str):
        raise TokenError(tokens)
    return list(tokens)


def parse_postgres(sql: str) -> exp.Expression:
    """``sqlglot.parse_one(sql, read="postgres")``, from the kept tokens: the parser only reads
    them. A new tree each time (trees are changed by whoever holds one)."""
    trees = Dialect.get_or_raise("postgres").parser().parse(postgres_tokens(sql), sql)
    if not trees or trees[0] is None:
        raise ParseError(f"No expression was parsed from '{sql[:100]}'")
    return exp.Block(expressions=trees) if len(trees) > 1 else trees[0]
