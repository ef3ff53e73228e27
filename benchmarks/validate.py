"""Validation rows/s: the validate stage's GX suite against hand-written vectorised pandas checks of the same rules.

The frame is the one the stage validates: sample tickets normalised to the dataset schema and read back
the way `tasks.validation.read_frame` reads a version (pandas `str` columns, nullable integers). Sizes
above 1M rows are 1M generated rows tiled with fresh ids.

- `gx`: `tasks.validation.validate_frame` — the spec's suite in an ephemeral GX context, including the
  Data Docs page it renders (what the stage runs, minus reading the Parquet parts).
- `gx_audit`: the same suite as the ingest audit runs it (`tasks/audit.py` `FileChecks`): the
  file-level expectations on batches of whole `ROWS_PER_PART` files up to `AUDIT_BATCH_BYTES` of Arrow
  data, one GX context for all of them and Data Docs rendered once (ids across batches and table-level
  checks are not GX's). Reading the files is not timed.
- `gx_files`: the same, one GX context and run per file: how the audit ran before it batched files (a GX
  run costs ~0.45 s whatever its size).
- `pandas`: `pandas_checks` below — every rule of `build_expectations` written directly in pandas, with
  the unexpected counts a report needs. Before timing, both are run on a frame with injected bad rows and
  must name the same failed (expectation, column) pairs, so the two sides check the same things.

Best of `--repeat` for each side, the sides interleaved so that they share the machine's noise.
`--without NAME ...` adds, in the same run, the GX side with one of `validate_frame`'s speedups turned
off (`tasks.validation.ALL_SPEEDUPS`: `shape_only` — string columns only shape checks read reach GX as
their null pattern; `fingerprint` — GX's whole-frame hash skipped; `narrow` — column checks get their
own column, not the whole frame; `templates` — Data Docs templates compiled once; `all` — none of them).

    python -m benchmarks.validate [--rows 1000000 10000000] [--repeat 3] [--without narrow templates ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from benchmarks.harness import record

BASE_ROWS = 1_000_000


def tickets_spec():
    from lifecycle.sample import SAMPLE_SPEC
    from lifecycle.spec import parse_spec

    return parse_spec({**SAMPLE_SPEC, "source": "tickets.csv"})


def stage_frame(frame: pd.DataFrame, spec) -> pd.DataFrame:
    """`frame` with the dataset schema and the dtypes `read_frame` gives a stored version."""
    import pyarrow as pa

    from tasks.sources import target_schema

    id_type = pa.int64() if pd.api.types.is_integer_dtype(frame[spec.id_column]) else pa.string()
    schema = target_schema(spec, id_type)
    table = pa.Table.from_pandas(frame[schema.names], preserve_index=False).cast(schema)
    nullable = {pa.int64(): pd.Int64Dtype()}
    return table.to_pandas(types_mapper=nullable.get)


def tickets(rows: int, spec) -> pd.DataFrame:
    from lifecycle.sample import generate_tickets

    base = generate_tickets(min(rows, BASE_ROWS))
    copies = []
    for start in range(0, rows, len(base)):
        part = base.iloc[: rows - start].copy()
        part["ticket_id"] = np.arange(start + 1, start + len(part) + 1, dtype=np.int64)
        copies.append(part)
    return stage_frame(pd.concat(copies, ignore_index=True) if len(copies) > 1 else copies[0], spec)


def pandas_checks(frame: pd.DataFrame, spec) -> list[tuple[str, str | None, int]]:
    """The rules of `tasks.validation.build_expectations`, vectorised: failed (expectation, column, count)."""
    from lifecycle.spec import Task

    exp = spec.expectations
    failed: list[tuple[str, str | None, int]] = []
    present = set(frame.columns)
    missing = [c for c in spec.required_columns if c not in present]
    failed += [("expect_column_to_exist", c, 0) for c in missing]

    string_cols = [*spec.categorical_features, *([spec.text_column] if spec.text_column else [])]
    numeric_cols = list(spec.numeric_features)
    if spec.task is Task.regression:
        numeric_cols.insert(0, spec.label_column)
    else:
        string_cols.insert(0, spec.label_column)
    for c in numeric_cols:
        if c in present and not (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])):
            failed.append(("expect_column_values_to_be_in_type_list", c, int(frame[c].notna().sum())))
    for c in string_cols:
        if c in present and not pd.api.types.is_string_dtype(frame[c]):
            failed.append(("expect_column_values_to_be_of_type", c, int(frame[c].notna().sum())))

    strict = list(dict.fromkeys([spec.id_column, spec.label_column, *exp.not_null]))
    nulls = {c: frame[c].isna() for c in present}
    for c in strict:
        if c in present and (n := int(nulls[c].sum())):
            failed.append(("expect_column_values_to_not_be_null", c, n))
    if spec.id_column in present:
        ids = frame[spec.id_column][~nulls[spec.id_column]]
        if n := int(ids.duplicated(keep=False).sum()):
            failed.append(("expect_column_values_to_be_unique", spec.id_column, n))
    label = frame[spec.label_column] if spec.label_column in present else None
    if spec.task is not Task.regression and label is not None:
        if exp.allowed_labels:
            values = label[~nulls[spec.label_column]]
            if n := int((~values.isin(list(exp.allowed_labels))).sum()):
                failed.append(("expect_column_values_to_be_in_set", spec.label_column, n))
        distinct = label.nunique(dropna=True)
        if distinct < 2 or (spec.task is Task.binary and distinct > 2):
            failed.append(("expect_column_unique_value_count_to_be_between", spec.label_column, 0))

    for c, bounds in exp.ranges.items():
        if c not in present or (bounds.min is None and bounds.max is None):
            continue
        values = frame[c][~nulls[c]]
        bad = np.zeros(len(values), dtype=bool)
        if bounds.min is not None:
            bad |= (values < bounds.min).to_numpy(dtype=bool)
        if bounds.max is not None:
            bad |= (values > bounds.max).to_numpy(dtype=bool)
        if n := int(bad.sum()):
            failed.append(("expect_column_values_to_be_between", c, n))

    if exp.max_null_fraction < 1:
        text = [spec.text_column] if spec.text_column else []
        features = [*spec.numeric_features, *spec.categorical_features, *text]
        for c in features:
            if c in present and c not in strict and nulls[c].mean() > exp.max_null_fraction:
                failed.append(("expect_column_values_to_not_be_null", c, int(nulls[c].sum())))
    rows = len(frame)
    if rows < exp.min_rows or (exp.max_rows is not None and rows > exp.max_rows):
        failed.append(("expect_table_row_count_to_be_between", None, 0))
    return failed


def check_same_rules(spec) -> None:
    """Both sides must fail the same expectations on the same bad rows, or the comparison is void."""
    from tasks.validation import validate_frame

    frame = tickets(5000, spec)
    frame.loc[[10, 20, 30], "sentiment"] = [5.0, -3.5, 7.25]
    frame.loc[40, "ticket_id"] = pd.NA
    frame.loc[51, "ticket_id"] = frame.loc[50, "ticket_id"]
    frame.loc[60, "category"] = "spam"
    frame.loc[70:400, "plan"] = None  # > 5 % nulls in a feature
    with tempfile.TemporaryDirectory() as docs:
        ok, _, gx_failed = validate_frame(frame, spec, "tickets@check", docs)
    ours = {(e, c) for e, c, _ in pandas_checks(frame, spec)}
    theirs = {(f.expectation, f.column) for f in gx_failed}
    if ok or ours != theirs:
        raise SystemExit(f"the two sides disagree: pandas {sorted(ours, key=str)} vs GX {sorted(theirs, key=str)}")
    with tempfile.TemporaryDirectory() as docs:
        assert validate_frame(tickets(5000, spec), spec, "tickets@good", docs)[0]
    assert pandas_checks(tickets(5000, spec), spec) == []


def interleaved_best(repeat: int, sides: dict) -> dict[str, float]:
    """Best wall time of each side over `repeat` rounds, one run of every side per round."""
    best = {name: float("inf") for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


WITHOUT = {
    "all": "GX as it comes",
    "shape_only": "GX given the text's values",
    "fingerprint": "GX fingerprints the frame",
    "narrow": "column checks given the whole frame",
    "templates": "Data Docs templates compiled per view",
    "fresh": "checkpoint read back to prove it fresh",
    "configs": "each expectation serialised at every read of its configuration",
}



def bench_rows(rows: int, spec, args) -> None:
    """Time GX against the pandas checks on one generated frame (freed when this returns)."""
    from tasks.validation import ALL_SPEEDUPS, validate_frame

    t0 = time.perf_counter()
    frame = tickets(rows, spec)
    print(f"{rows} rows: frame ready in {time.perf_counter() - t0:.0f} s", flush=True)

    def gx(speedups=ALL_SPEEDUPS) -> None:
        with tempfile.TemporaryDirectory(prefix="gx-docs-") as docs:
            ok, _, failed = validate_frame(frame, spec, f"tickets@bench-{rows}", docs, speedups=speedups)
        assert ok and not failed

    from tasks.audit import AUDIT_BATCH_BYTES, file_expectations
    from tasks.ingest import ROWS_PER_PART

    files = list(range(0, rows, ROWS_PER_PART))
    batches: list[tuple[int, int, int]] = []  # (start, stop, bytes) rows, grouped as tasks.audit._batches groups files
    for start in files:
        stop = min(start + ROWS_PER_PART, rows)
        size = pa.Table.from_pandas(frame.iloc[start:stop], preserve_index=False).nbytes
        if batches and batches[-1][2] + size <= AUDIT_BATCH_BYTES:
            batches[-1] = (batches[-1][0], stop, batches[-1][2] + size)
        else:
            batches.append((start, stop, size))

    def gx_slices(slices: list[tuple[int, int]]) -> None:
        import gc

        with tempfile.TemporaryDirectory(prefix="gx-docs-") as docs:
            for i, (start, stop) in enumerate(slices):
                ok, _, failed = validate_frame(frame.iloc[start:stop], spec, f"tickets@bench-{rows}-batch{i:04d}",
                                               docs, expectations=file_expectations(spec))
                assert ok and not failed
                gc.collect()

    def gx_audit() -> None:
        """As tasks.audit.FileChecks runs it: one GX context for every batch, Data Docs rendered once."""
        import gc

        from tasks.validation import SuiteRuns

        with tempfile.TemporaryDirectory(prefix="gx-docs-") as docs:
            runs = SuiteRuns(spec, docs, f"tickets@bench-{rows}", file_expectations(spec))
            for i, (start, stop, _) in enumerate(batches):
                ok, _, failed = runs.run(frame.iloc[start:stop], f"tickets@bench-{rows}-batch{i:04d}")
                assert ok and not failed
                gc.collect()
            runs.finish()

    def gx_files() -> None:
        gx_slices([(start, min(start + ROWS_PER_PART, rows)) for start in files])  # validate_frame each

    def hand() -> None:
        assert pandas_checks(frame, spec) == []

    sides: dict[str, Callable[[], None]] = {"pandas": hand, "gx": gx, "gx_audit": gx_audit, "gx_files": gx_files}
    for off in args.without:
        rest = () if off == "all" else tuple(s for s in ALL_SPEEDUPS if s != off)
        sides[f"gx_without_{off}"] = lambda rest=rest: gx(rest)
    best = interleaved_best(args.repeat, sides)
    tag = f"{rows // 1_000_000}M rows" if rows >= 1_000_000 else f"{rows} rows"
    baseline = "hand-written vectorised pandas checks of the same rules"
    record(f"validate.pandas_checks ({tag})", rows / best["pandas"], "rows/s")
    record(f"validate.gx_suite ({tag})", rows / best["gx"], "rows/s", baseline=baseline,
           baseline_value=rows / best["pandas"], goal=">= 0.5x")
    record(f"validate.gx_suite_audit ({tag}, {ROWS_PER_PART // 1000}k-row files in {len(batches)} batches "
           f"<= {AUDIT_BATCH_BYTES >> 20} MiB, as the ingest audit runs it)", rows / best["gx_audit"], "rows/s",
           baseline=baseline, baseline_value=rows / best["pandas"], goal=">= 0.5x")
    record(f"validate.gx_suite_per_file ({tag}, {ROWS_PER_PART // 1000}k-row files, before: one GX run per file)",
           rows / best["gx_files"], "rows/s", baseline=baseline, baseline_value=rows / best["pandas"], goal=">= 0.5x")
    for off in args.without:
        record(f"validate.gx_suite ({tag}, before: {WITHOUT[off]})", rows / best[f"gx_without_{off}"], "rows/s",
               baseline=baseline, baseline_value=rows / best["pandas"], goal=">= 0.5x")
    print("  " + "  ".join(f"{name} {t:.2f}s" for name, t in best.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--without", nargs="*", default=[], choices=sorted(WITHOUT),
                        help="Also time GX with this speedup off (all: with none of them).")
    args = parser.parse_args()

    spec = tickets_spec()
    check_same_rules(spec)
    for rows in args.rows:
        bench_rows(rows, spec, args)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
