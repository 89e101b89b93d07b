"""A statement's words as sqlglot's PostgreSQL tokenizer splits them, split once per text.

The gate, the placeholder rewriting, the table-function arguments and the search and model
rewriters each read a statement's tokens, mostly of the same text: tokenizing is the costliest
step of all that (0.4 s for a 100,000-value IN list), so the last texts' tokens are kept. They
are weighed by the text's length (about 64 bytes of tokens per character), so a few large
statements cannot make the cache hold much; one longer than the whole cache is not kept.
"""
from __future__ import annotations

import threading

import cachetools
import sqlglot
from sqlglot.errors import TokenError
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
