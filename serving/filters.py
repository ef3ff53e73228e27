"""Structured `/search` filters, compiled by us into a bounded Lance SQL predicate.

Why not the client's SQL: a raw Lance filter of 1,000 `0+0+…` terms segfaulted a LanceDB worker
thread and took the whole server down; text after `;` was silently ignored; and errors listed the
table's columns and echoed the whole filter (200 KB for a 100k-paren one). A client now sends data,
not code:

    {"category": "billing"}                        equality (null: IS NULL)
    {"plan": {"in": ["pro", "team"]}}              membership (`not_in` too)
    {"amount": {"gte": 1, "lt": 5}}                ranges (gt, gte, lt, lte), `ne`, `eq`
    {"category": "billing", "plan": {"ne": "free"}}  several columns: all must hold (AND)

A string filter is accepted only in a tiny subset, for the clients of the SQL era: comparisons
`column OP value` (OP one of = != < <= > >=, value a '…' string or a number) joined by AND, at
most `MAX_STRING_TERMS` of them and `MAX_STRING_CHARS` long, e.g. `category = 'billing' AND amount
>= 2`. It is parsed into the structured form above and compiled the same way; anything else
(`;`, parentheses, OR, functions, arithmetic) is refused.

Only the index's metadata columns are known; values are checked against the column's Arrow type
(strings quoted with `'` doubled, numbers finite and in range, booleans TRUE/FALSE). Bounds: at
most `MAX_TERMS` values in all, `MAX_VALUE_CHARS` per string, `MAX_SQL_CHARS` compiled. Every refusal
is a `FilterError` naming the problem (and at most a 40-character column name), never the filter
or the list of columns.
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_TERMS = 64
MAX_VALUE_CHARS = 200
MAX_SQL_CHARS = 16_384
INT64 = 2**63
RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
OPS = {"eq", "ne", "in", "not_in", *RANGE_OPS}
KINDS = ("string", "integer", "float", "boolean")
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_STRING_CHARS = 1000
MAX_STRING_TERMS = 16
_COMPARISON = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=|!=|<>|<=|>=|<|>)\s*"
                         r"('(?:[^']|'')*'|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*")
_SQL_OPS = {"=": "eq", "!=": "ne", "<>": "ne", "<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}
_AND = re.compile(r"\s+AND\s+", re.IGNORECASE)


class FilterError(ValueError):
    """A filter this server will not run; the message is safe to return to the client."""


def _name(column: Any) -> str:
    text = str(column)
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


def column_kind(arrow_type: Any) -> str | None:
    """The filter kind of a pyarrow type (None: not filterable, e.g. lists or structs)."""
    import pyarrow as pa

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_dictionary(arrow_type):
        return "string"
    if pa.types.is_boolean(arrow_type):
        return "boolean"
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return "float"
    return None


def _identifier(column: str) -> str:
    return column if _PLAIN.fullmatch(column) else f"`{column}`"


def literal(value: Any, kind: str, column: str) -> str:
    """One value as a Lance SQL literal of the column's kind.

    Raises:
        FilterError: the value's JSON type does not fit the column, or it is out of bounds.
    """
    if kind == "string":
        if not isinstance(value, str):
            raise FilterError(f"filter: column {_name(column)} holds strings; got JSON of type {type(value).__name__}")
        if len(value) > MAX_VALUE_CHARS:
            raise FilterError(f"filter: a value for {_name(column)} is longer than {MAX_VALUE_CHARS} characters")
        if "\x00" in value:
            raise FilterError(f"filter: a value for {_name(column)} contains a NUL character")
        return "'" + value.replace("'", "''") + "'"
    if kind == "boolean":
        if not isinstance(value, bool):
            raise FilterError(f"filter: column {_name(column)} holds booleans; got JSON of type {type(value).__name__}")
        return "TRUE" if value else "FALSE"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FilterError(f"filter: column {_name(column)} holds numbers; got JSON of type {type(value).__name__}")
    if isinstance(value, int):
        if not -INT64 <= value < INT64:
            raise FilterError(f"filter: a value for {_name(column)} is out of the 64-bit range")
        return str(value)
    if not math.isfinite(value) or abs(value) > 1.7e308:
        raise FilterError(f"filter: a value for {_name(column)} is not a finite number")
    return repr(value)


def _condition(column: str, kind: str, cond: Any) -> tuple[list[str], int]:
    """The predicates of one column's condition, and how many values they used."""
    ident = _identifier(column)
    if cond is None:
        return [f"{ident} IS NULL"], 1
    if not isinstance(cond, dict):
        return [f"{ident} = {literal(cond, kind, column)}"], 1
    if not cond:
        raise FilterError(f"filter: the condition on {_name(column)} is empty")
    parts: list[str] = []
    terms = 0
    for op, value in cond.items():
        if op not in OPS:
            raise FilterError(f"filter: unknown operator {_name(op)} on {_name(column)} "
                              f"(known: {', '.join(sorted(OPS))})")
        if op in ("in", "not_in"):
            if not isinstance(value, list) or not value:
                raise FilterError(f"filter: '{op}' on {_name(column)} takes a non-empty list")
            if len(value) > MAX_TERMS:
                raise FilterError(f"filter: '{op}' on {_name(column)} has {len(value)} values; at most {MAX_TERMS}")
            values = ", ".join(literal(v, kind, column) for v in value)
            parts.append(f"{ident} {'IN' if op == 'in' else 'NOT IN'} ({values})")
            terms += len(value)
        elif op in ("eq", "ne") and value is None:
            parts.append(f"{ident} IS {'NOT ' if op == 'ne' else ''}NULL")
            terms += 1
        else:
            if op in RANGE_OPS and kind == "boolean":
                raise FilterError(f"filter: '{op}' needs a number or string column; {_name(column)} holds booleans")
            sql_op = RANGE_OPS.get(op) or ("=" if op == "eq" else "!=")
            parts.append(f"{ident} {sql_op} {literal(value, kind, column)}")
            terms += 1
    return parts, terms


def parse_string_filter(text: str) -> dict[str, dict[str, Any]]:
    """The tiny SQL subset (`col OP value [AND …]`) → the structured form.

    Raises:
        FilterError: the string is too long, has too many terms, or anything outside the subset.
    """
    if len(text) > MAX_STRING_CHARS:
        raise FilterError(f"filter: a string filter may be at most {MAX_STRING_CHARS} characters; "
                          "send a structured filter (an object)")
    terms = _AND.split(text.strip())
    if len(terms) > MAX_STRING_TERMS:
        raise FilterError(f"filter: a string filter may have at most {MAX_STRING_TERMS} comparisons")
    out: dict[str, dict[str, Any]] = {}
    for i, term in enumerate(terms, start=1):
        match = _COMPARISON.fullmatch(term)
        if match is None:
            raise FilterError(f"filter: comparison {i} is outside the supported subset (column OP value joined by "
                              "AND; OP one of = != < <= > >=; value a quoted string or a number)")
        column, op, raw = match.groups()
        value: Any = raw[1:-1].replace("''", "'") if raw.startswith("'") else (
            float(raw) if any(c in raw for c in ".eE") else int(raw))
        ops = out.setdefault(column, {})
        if _SQL_OPS[op] in ops:
            raise FilterError(f"filter: comparison {i} repeats an operator on {_name(column)}")
        ops[_SQL_OPS[op]] = value
    return out


def compile_filter(spec: Any, columns: dict[str, str]) -> str | None:
    """A structured filter → a Lance SQL predicate over `columns` (name → kind), or None for no filter.

    Raises:
        FilterError: naming what is wrong (unknown column or operator, wrong type, over a bound).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = parse_string_filter(spec) if spec.strip() else {}
    if not isinstance(spec, dict):
        raise FilterError("filter: must be an object mapping metadata columns to conditions")
    if not spec:
        return None
    if len(spec) > MAX_TERMS:
        raise FilterError(f"filter: {len(spec)} conditions; at most {MAX_TERMS}")
    predicates: list[str] = []
    terms = 0
    for column, cond in spec.items():
        kind = columns.get(column) if isinstance(column, str) else None
        if kind is None:
            raise FilterError(f"filter: {_name(column)} is not a filterable metadata column of this index")
        parts, used = _condition(column, kind, cond)
        predicates += parts
        terms += used
        if terms > MAX_TERMS:
            raise FilterError(f"filter: more than {MAX_TERMS} values in all")
    sql = " AND ".join(f"({p})" for p in predicates)
    if len(sql) > MAX_SQL_CHARS:
        raise FilterError(f"filter: longer than {MAX_SQL_CHARS} characters once compiled")
    return sql
