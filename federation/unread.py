"""Statements the gate's parser cannot read, which the engine may: what they may not do.

DataFusion reads a few forms sqlglot's PostgreSQL parser does not (`backquoted` names,
``t SAMPLE 1``). The size bound (``federation.sizes``) cannot follow such a statement's
expressions, and the engine would make their values unchecked. So on its words alone, such a
statement may call only functions whose values are small or one of their arguments, besides
table functions, and may not concatenate or build lists or tuples: nothing in it can make a
value larger than those it reads, and it is kept short and simple (``MAX_UNREAD_TOKENS``).
Anything else is left to the engine, which reads it under read-only options.
"""
from __future__ import annotations

from sqlglot.tokens import Token, TokenType

from federation.sizes import SMALL_RESULTS, TooLarge
from federation.tokens import postgres_tokens

# Words after which a call is a table function, whose rows stream: not one value made whole.
_TABLE_FUNCTION_AFTER = frozenset({TokenType.FROM, TokenType.JOIN, TokenType.LATERAL})
# Words after which a parenthesis is not a call's.
_PARENTHESES_AFTER = frozenset({TokenType.IN, TokenType.EXISTS, TokenType.OVER, TokenType.FILTER})
_BEFORE_ALIAS_COLUMNS = frozenset({TokenType.VAR, TokenType.IDENTIFIER, TokenType.ALIAS, TokenType.R_PAREN})
# Clause keywords a parenthesis may follow without being called (any other word is a call's name).
_CLAUSE_WORDS = frozenset({
    TokenType.SELECT, TokenType.WHERE, TokenType.AND, TokenType.OR, TokenType.NOT, TokenType.ON, TokenType.THEN,
    TokenType.ELSE, TokenType.WHEN, TokenType.CASE, TokenType.FROM, TokenType.JOIN, TokenType.HAVING,
    TokenType.ORDER_BY, TokenType.GROUP_BY, TokenType.PARTITION_BY, TokenType.BETWEEN, TokenType.IS,
    TokenType.LIKE, TokenType.ILIKE, TokenType.ALIAS, TokenType.DISTINCT, TokenType.LIMIT, TokenType.OFFSET,
    TokenType.UNION, TokenType.INTERSECT, TokenType.EXCEPT, TokenType.ALL, TokenType.ANY, TokenType.SOME,
    TokenType.LATERAL, TokenType.WITH, TokenType.RECURSIVE, TokenType.USING, TokenType.DESC, TokenType.ASC,
})
# The calls a statement the gate cannot read may make: small values, or one of their arguments.
_UNREAD_CALLS = SMALL_RESULTS | frozenset("""
    min max coalesce nullif cast try_cast substr substring left right trim btrim ltrim rtrim date_trunc
""".split())


# The words a statement the gate cannot read may have. How deep its expressions nest and how many
# grouping sets it makes are known only from a parsed tree: without one, the statement is kept
# short (a chain of some thousands of ORs overflows the planner's stack) and without
# CUBE/ROLLUP/GROUPING SETS; its CTEs are weighed by their names (``_expansion``).
MAX_UNREAD_TOKENS = 1000
# CTE bodies a statement may plan, each as many times as it is read (planning a thousand takes
# about 0.1 s here).
MAX_EXPANDED = 1000


class Unreadable(ValueError):
    """A statement not even split into words, which might make values the gate cannot see."""


def check_unread(sql: str) -> None:
    """Raise TooLarge if a statement the gate's parser cannot read may make a value larger than
    those it reads (see the module's docstring); Unreadable if it cannot even be split into
    words and could."""
    try:
        tokens = postgres_tokens(sql)
    except Exception as error:  # an unterminated quote or comment: the engine's own error says where
        if any(mark in sql for mark in ("(", "[", "{", "||")):
            raise Unreadable(f"syntax error: {error}") from None
        return
    tokens = _backquoted_as_names(tokens)
    if len(tokens) > MAX_UNREAD_TOKENS:
        raise TooLarge(_unread_shape(f"has {len(tokens):,} words (at most {MAX_UNREAD_TOKENS:,})"))
    grouping = next((t.text for t in tokens if t.text.upper() in ("CUBE", "ROLLUP", "GROUPING")), None)
    if grouping is not None:
        raise TooLarge(_unread_shape(f"uses {grouping.upper()}"))
    closing = closing_parentheses(tokens)
    if _expansion(tokens, closing) > MAX_EXPANDED:
        raise TooLarge(_unread_shape(f"reads its CTEs so that they would be planned more than {MAX_EXPANDED:,} times"))
    rows: set[int] = set()  # where the rows of a VALUES list close
    for position, token in enumerate(tokens):
        if token.token_type in (TokenType.DPIPE, TokenType.L_BRACKET, TokenType.L_BRACE):
            raise TooLarge(_unread(f"uses {token.text}"))
        if token.token_type != TokenType.L_PAREN:
            continue
        before = tokens[position - 1] if position else None
        earlier = tokens[position - 2] if position > 1 else None
        if before is not None and (before.token_type == TokenType.VALUES or (
                before.token_type == TokenType.COMMA and earlier is not None and position - 2 in rows)):
            rows.add(closing.get(position, -1))
        elif before is not None and before.token_type in _PARENTHESES_AFTER:
            continue  # IN (...), EXISTS (...), OVER (...), FILTER (...)
        elif before is not None and _names_something(before):
            if earlier is not None and earlier.token_type in _TABLE_FUNCTION_AFTER:
                continue  # FROM range(n): a table function's rows stream
            if _names_only(tokens, position, closing.get(position, len(tokens))) and (
                    earlier is not None and earlier.token_type in _BEFORE_ALIAS_COLUMNS
                    or _cte_columns(tokens, position, closing.get(position, len(tokens)))):
                continue  # a table alias's or a CTE's column names: AS v(a, b), WITH t(a, b) AS (...)
            if before.text.lower() not in _UNREAD_CALLS:
                raise TooLarge(_unread(f"calls {before.text}"))
        elif _tuple_inside(tokens, position, closing.get(position, len(tokens))):
            raise TooLarge(_unread("makes a tuple"))


def _expansion(tokens: list, closing: dict[int, int]) -> int:
    """How many CTE bodies the statement would plan, each again wherever its name is read: an
    upper bound from the words alone (a name counts wherever it appears, shadowed or not). Each
    CTE is weighed once the CTEs inside it and before it are, in the order their bodies close."""
    bodies = []  # (where the body opens, where it closes, the CTE's name)
    defined = set()  # where CTEs are named
    for position, token in enumerate(tokens[1:-1], start=1):
        if token.token_type not in (TokenType.VAR, TokenType.IDENTIFIER) or tokens[position - 1].token_type not in (
                TokenType.WITH, TokenType.RECURSIVE, TokenType.COMMA):
            continue
        after = closing.get(position + 1, position) + 1 if tokens[position + 1].token_type == TokenType.L_PAREN \
            else position + 1
        if after + 1 < len(tokens) and tokens[after].token_type == TokenType.ALIAS \
                and tokens[after + 1].token_type == TokenType.L_PAREN and after + 1 in closing:
            bodies.append((after + 1, closing[after + 1], token.text.lower()))
            defined.add(position)
    weights: dict[str, int] = {}

    def reads(start: int, end: int, inside: list) -> int:
        return sum(weights.get(t.text.lower(), 0) for at, t in enumerate(tokens[start:end], start=start)
                   if t.token_type in (TokenType.VAR, TokenType.IDENTIFIER) and at not in defined
                   and not any(o < at < c for o, c, _ in inside))
    for opening, closed, name in sorted(bodies, key=lambda body: body[1]):
        inner = [body for body in bodies if opening < body[0] and body[1] < closed]
        weights[name] = min(max(weights.get(name, 0), 1 + reads(opening, closed, inner)), MAX_EXPANDED + 1)
    return 1 + reads(0, len(tokens), bodies)


def _unread_shape(what: str) -> str:
    return (f"the statement {what}, in SQL the gate cannot read, where its size and shape are known from its words "
            "alone: write it in PostgreSQL's syntax (names in double quotes)")


def _unread(what: str) -> str:
    return (f"the statement {what}, whose values are bounded before planning, in SQL the gate cannot read: "
            "write it in PostgreSQL's syntax (names in double quotes)")


def _backquoted_as_names(tokens: list) -> list:
    """The tokens with each `backquoted name` (which the PostgreSQL tokenizer leaves in pieces) as one name."""
    merged: list = []
    opened: int | None = None  # where the backquote being read opened
    for position, token in enumerate(tokens):
        if token.token_type == TokenType.UNKNOWN and token.text == "`":
            if opened is None:
                opened = position
            else:
                merged.append(Token(TokenType.IDENTIFIER, " ".join(t.text for t in tokens[opened + 1:position])))
                opened = None
        elif opened is None:
            merged.append(token)
    return merged + (tokens[opened:] if opened is not None else [])


def closing_parentheses(tokens: list) -> dict[int, int]:
    """Each opening parenthesis's position -> its closing one's."""
    opened, closing = [], {}
    for position, token in enumerate(tokens):
        if token.token_type == TokenType.L_PAREN:
            opened.append(position)
        elif token.token_type == TokenType.R_PAREN and opened:
            closing[opened.pop()] = position
    return closing


def _names_only(tokens: list, opening: int, closing: int) -> bool:
    """A parenthesis holding names and commas only: what a list of column names is."""
    return all(token.token_type in (TokenType.VAR, TokenType.IDENTIFIER, TokenType.COMMA)
               for token in tokens[opening + 1:closing])


def _cte_columns(tokens: list, opening: int, closing: int) -> bool:
    """``WITH t(a, b) AS (`` or ``, t(a, b) AS (``: a CTE's names for its columns."""
    earlier = tokens[opening - 2] if opening > 1 else None
    return (earlier is not None and earlier.token_type in (TokenType.WITH, TokenType.RECURSIVE, TokenType.COMMA)
            and closing + 2 < len(tokens) and tokens[closing + 1].token_type == TokenType.ALIAS
            and tokens[closing + 2].token_type == TokenType.L_PAREN)


def _names_something(token) -> bool:
    """A name, or a word that is not a clause's keyword: what a call or an alias would be."""
    return token.token_type in (TokenType.VAR, TokenType.IDENTIFIER) or (
        token.text[:1].isalpha() and token.token_type not in _CLAUSE_WORDS)


def _tuple_inside(tokens: list, opening: int, closing: int) -> bool:
    """A parenthesis holding a comma of its own, not a subquery's: a tuple, made a struct."""
    if opening + 1 < len(tokens) and tokens[opening + 1].token_type in (TokenType.SELECT, TokenType.WITH,
                                                                        TokenType.VALUES):
        return False
    depth = 0
    for token in tokens[opening + 1:closing]:
        depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(token.token_type, 0)
        if depth == 0 and token.token_type == TokenType.COMMA:
            return True
    return False
