"""Request parsing for the serving app: MLflow scoring payloads and `/search` payloads, strictly typed.

Why strict where the protocol is strict (issue 16): a lenient reading turned `"probabilities":
"false"` into probabilities, a numeric `""` into NaN and `"12"` into 12 without a word, and `1e308`
into inf with a RuntimeWarning per request in the log. MLflow's schema enforcement refuses all of
these, so do we: a 400 naming the field. A request over `max_rows` is refused with 413 before any
prediction, which bounds the answer (520k rows once produced 89 MB and stalled `/health`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
MAX_K = 1000
FLOAT32_MAX = 3.4028234663852886e38  # the model's matrix is float32: a larger value would become inf


class Problem(Exception):
    """An HTTP error with an MLflow-style body."""

    CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
             408: "REQUEST_TIMEOUT", 413: "REQUEST_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE",
             499: "CLIENT_CLOSED_REQUEST", 500: "INTERNAL_ERROR", 503: "SERVICE_UNAVAILABLE"}

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _from_records(records: Any, fmt: str, wanted: Sequence[str]) -> tuple[dict[str, list], int]:
    if not isinstance(records, list):
        raise Problem(400, f"{fmt} must be a list of objects, one per row")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise Problem(400, f"{fmt}[{i}] must be an object mapping column names to values")
    present = {c for rec in records for c in rec} if records else set(wanted)
    return {c: [rec.get(c) for rec in records] for c in wanted if c in present}, len(records)


def _from_columns(cols: dict[str, Any], fmt: str, wanted: Sequence[str]) -> tuple[dict[str, list], int]:
    lengths = {len(v) for c, v in cols.items() if c in wanted and isinstance(v, list)}
    if len(lengths) > 1:
        raise Problem(400, f"{fmt}: columns have different lengths ({', '.join(map(str, sorted(lengths)))})")
    rows = lengths.pop() if lengths else 1
    return {c: (v if isinstance(v, list) else [v] * rows) for c, v in cols.items() if c in wanted}, rows


def _from_split(split: Any, wanted: Sequence[str]) -> tuple[dict[str, list], int]:
    if not isinstance(split, dict) or not isinstance(split.get("columns"), list) \
            or not isinstance(split.get("data"), list):
        raise Problem(400, "dataframe_split must be an object with 'columns' (names) and 'data' (rows)")
    names, data = split["columns"], split["data"]
    for i, row in enumerate(data):
        if not isinstance(row, list) or len(row) != len(names):
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise Problem(400, f"dataframe_split.data[{i}] has {got} values for {len(names)} columns")
    pos = {name: i for i, name in enumerate(names) if isinstance(name, str)}
    return {c: [row[pos[c]] for row in data] for c in wanted if c in pos}, len(data)


def wants_probabilities(payload: dict[str, Any]) -> bool:
    """MLflow's `params` field; `{"probabilities": true}` adds `proba_<class>` (as the pyfunc does).

    Raises:
        Problem: `params` is not an object, or `probabilities` is not a JSON boolean.
    """
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise Problem(400, "'params' must be an object")
    value = (params or {}).get("probabilities", False)
    if not isinstance(value, bool):
        raise Problem(400, "params.probabilities must be true or false (a JSON boolean)")
    return value


def _rows_of(fmt: str, value: Any) -> int | None:
    """The row count a payload announces, read before any column is built (None: let parsing say why)."""
    if fmt == "dataframe_split":
        data = value.get("data") if isinstance(value, dict) else None
        return len(data) if isinstance(data, list) else None
    if isinstance(value, list):
        return len(value)
    if isinstance(value, dict):
        return max((len(v) for v in value.values() if isinstance(v, list)), default=1)
    return None


def check_numeric(columns: dict[str, list], numeric: Sequence[str]) -> None:
    """Numeric columns hold JSON numbers (or null): no strings, no booleans, nothing beyond float32.

    Raises:
        Problem: 400 naming the column and the row of the first value refused.
    """
    for col in numeric:
        for i, value in enumerate(columns.get(col, ())):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                kind = "a string" if isinstance(value, str) else f"a {type(value).__name__}"
                if isinstance(value, bool):
                    kind = "a boolean"
                raise Problem(400, f"column {col!r} must be numeric: row {i} is {kind} (send a JSON number or null)")
            if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                raise Problem(400, f"column {col!r}: row {i} is out of range (finite, |x| ≤ {FLOAT32_MAX:.4g})")


def parse_invocation(payload: Any, wanted: Sequence[str], max_rows: int | None = None,
                     numeric: Sequence[str] = ()) -> tuple[dict[str, list], int]:
    """An MLflow scoring payload → (the wanted columns as lists, number of rows).

    Raises:
        Problem: 400 naming the format problem, the missing columns or a refused value; 413 over `max_rows`.
    """
    if not isinstance(payload, dict):
        raise Problem(400, f"payload must be a JSON object with one of the keys {', '.join(FORMATS)}")
    keys = [k for k in FORMATS if k in payload]
    if len(keys) != 1:
        found = ", ".join(str(k)[:40] for k in list(payload)[:10]) or "none"
        raise Problem(400, f"payload must have exactly one of {', '.join(FORMATS)} (found keys: {found})")
    fmt = keys[0]
    value = payload[fmt]
    announced = _rows_of(fmt, value)
    if max_rows is not None and announced is not None and announced > max_rows:
        raise Problem(413, f"request has {announced} rows; this server takes at most max_rows={max_rows} per request")
    if fmt == "dataframe_split":
        columns, rows = _from_split(value, wanted)
    elif fmt == "dataframe_records":
        columns, rows = _from_records(value, fmt, wanted)
    elif isinstance(value, dict):
        columns, rows = _from_columns(value, fmt, wanted)
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        columns, rows = _from_records(value, fmt, wanted)
    else:
        raise Problem(400, f"{fmt} must be an object of columns or a list of row objects (this model has named inputs)")
    missing = [c for c in wanted if c not in columns]
    if missing and rows:
        raise Problem(400, f"missing input column(s): {', '.join(missing)}")
    check_numeric(columns, numeric)
    return columns, rows


def parse_search(payload: Any) -> tuple[str, int, Any]:
    """A `/search` payload → (query, k, filter or None); the filter (an object, or a string in the tiny
    subset) is checked and compiled by `serving.filters`."""
    if not isinstance(payload, dict):
        raise Problem(400, "search payload must be a JSON object with 'query'")
    query, k, where = payload.get("query"), payload.get("k", 5), payload.get("filter")
    if not isinstance(query, str) or not query.strip():
        raise Problem(400, "'query' must be a non-empty string")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise Problem(400, f"'k' must be an integer from 1 to {MAX_K}")
    if where is not None and not isinstance(where, (dict, str)):
        raise Problem(400, "'filter' must be an object of metadata conditions, e.g. {\"category\": \"billing\"} "
                      "or {\"price\": {\"gte\": 1, \"lt\": 5}}, or null")
    return query, k, where
