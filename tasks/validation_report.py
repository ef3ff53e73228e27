"""How a validation verdict reads: one short detail per failed expectation, one line for an error
message, and the Markdown of the Prefect artifact (split from tasks/validation.py to keep both small)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from infra_blocks import ObjectStore
from lifecycle.records import FailedExpectation, ValidationReport

EXAMPLES = 3


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _percent(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") + "%"


def describe_failure(expectation: str, kwargs: dict[str, Any], result: dict[str, Any],
                     exception: dict[str, Any] | None) -> str:
    """A short human detail for one failed expectation: counts, a few values, or the observed value."""
    if exception and exception.get("raised_exception"):
        message = (exception.get("exception_message") or "error").strip().splitlines()[0]
        return f"error: {message[:160]}"
    if expectation == "expect_column_to_exist":
        return "column not found"
    if result.get("unexpected_count") is not None:
        count = int(result["unexpected_count"])
        share = _percent(result.get("unexpected_percent") or 0.0)
        detail = f"{count} row{'s' if count != 1 else ''} unexpected ({share}"
        mostly = kwargs.get("mostly")
        if mostly is not None and mostly < 1:
            detail += f", at most {_percent((1 - mostly) * 100)} allowed"
        detail += ")"
        examples = []
        for v in result.get("partial_unexpected_list") or []:
            if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
                continue
            if _short(v) not in examples:
                examples.append(_short(v))
            if len(examples) == EXAMPLES:
                break
        return detail + (f", e.g. {', '.join(examples)}" if examples else "")
    observed = result.get("observed_value")
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    expected = ""
    if low is not None or high is not None:
        expected = f" (expected {'>= ' + _short(low) if low is not None else ''}"
        expected += ", " if low is not None and high is not None else ""
        expected += f"<= {_short(high)}" if high is not None else ""
        expected += ")"
    return f"observed {_short(observed)}{expected}" if observed is not None else "failed"


def summarize(results: list[Any]) -> list[FailedExpectation]:
    """FailedExpectations from GX ExpectationValidationResults, dropping echoes of a missing column.

    A missing column fails `expect_column_to_exist` and makes every other check on it raise; only the
    first is worth reporting.
    """
    failed: list[FailedExpectation] = []
    missing = {r.expectation_config.kwargs.get("column") for r in results
               if not r.success and r.expectation_config.type == "expect_column_to_exist"}
    for r in results:
        cfg = r.expectation_config
        column = cfg.kwargs.get("column")
        if r.success or (column in missing and cfg.type != "expect_column_to_exist"):
            continue
        detail = describe_failure(cfg.type, dict(cfg.kwargs), dict(r.result or {}), dict(r.exception_info or {}))
        failed.append(FailedExpectation(expectation=cfg.type, column=column, detail=detail))
    return failed


def failure_line(report: ValidationReport, limit: int = 6) -> str:
    """The failed expectations as one line: `type(column) detail; …`."""
    items = [f"{f.expectation}({f.column})" if f.column else f.expectation for f in report.failed]
    parts = [f"{name} {f.detail}".strip() for name, f in zip(items, report.failed)]
    more = len(parts) - limit
    return "; ".join(parts[:limit]) + (f"; and {more} more" if more > 0 else "")


def report_markdown(report: ValidationReport, store: ObjectStore) -> str:
    """The Prefect artifact body: verdict, counts, failed expectations and where the Data Docs are."""
    verdict = "passed" if report.success else "**failed: quarantined**"
    lines = [
        f"# Validation of {report.dataset}@{report.dataset_version}: {verdict}", "",
        "| result | value |", "|---|---|",
        f"| expectations evaluated | {report.evaluated} |",
        f"| failed | {len(report.failed)} |",
        f"| report | `{report.key}` |",
        f"| Data Docs | `{store.uri(report.docs_key) if report.docs_key else 'none'}` |", "",
    ]
    if report.failed:
        lines += ["## Failed expectations", "", "| expectation | column | detail |", "|---|---|---|"]
        lines += [f"| {f.expectation} | {f.column or ''} | {f.detail.replace('|', '/')} |" for f in report.failed]
    return "\n".join(lines)
