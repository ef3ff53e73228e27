"""The GX speedups change no result: a frame with every kind of bad row gives the same verdict, count and
failure details with and without them, the same Data Docs pages, richer result formats keep their rows
and index columns, and GX is left as it was found."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import numpy as np
import pytest

from lifecycle.sample import SAMPLE_SPEC, generate_tickets
from lifecycle.spec import parse_spec
from tasks.gx_speedups import SPEEDUPS, gx_speedups


def bad_frame():
    frame = generate_tickets(800, seed=11)
    frame["ticket_id"] = frame["ticket_id"].astype("Int64")
    for col in ("category", "channel", "plan", "text"):
        frame[col] = frame[col].astype("str")
    frame.loc[[10, 20, 30], "sentiment"] = [5.0, -3.5, 7.25]
    frame.loc[40, "ticket_id"] = None
    frame.loc[51, "ticket_id"] = frame.loc[50, "ticket_id"]
    frame.loc[60, "category"] = "spam"
    frame.loc[np.arange(0, 800, 9), "text"] = None  # 11 % nulls: over the 5 % allowed
    frame.loc[np.arange(1, 800, 15), "account_age_days"] = np.nan
    return frame


# What differs between two runs of the same validation: run times, ids.
VOLATILE = [(r"\d{8}T\d{6}\.\d+Z", "<run>"),
            (r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(\+00:00|Z)?", "<time>"),
            (r"'_run_time_sort': [\d.]+", "<sort>"),
            (r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>"),
            (r"[0-9a-f]{32}", "<hex>")]


def pages(root) -> dict[str, str]:
    """The Data Docs pages written (path → HTML), run times and ids masked."""
    def masked(text: str) -> str:
        for pattern, mask in VOLATILE:
            text = re.sub(pattern, mask, text)
        return text

    return {masked(p.relative_to(root).as_posix()): masked(p.read_text()) for p in root.rglob("*.html")}


@pytest.mark.parametrize("off", ["all", *SPEEDUPS, "shape_only"])
def test_results_and_docs_are_those_of_gx_unpatched(tmp_path, off):
    from tasks.validation import ALL_SPEEDUPS, validate_frame

    spec = parse_spec({**SAMPLE_SPEC, "source": "tickets.csv",
                       "expectations": {**SAMPLE_SPEC["expectations"], "max_null_fraction": 0.05}})
    frame = bad_frame()
    fast = validate_frame(frame, spec, "tickets@fast", str(tmp_path / "fast"))
    rest = () if off == "all" else [s for s in ALL_SPEEDUPS if s != off]
    slow = validate_frame(frame, spec, "tickets@fast", str(tmp_path / "slow"), speedups=rest)
    assert not fast[0] and len(fast[2]) >= 5
    assert fast == slow
    fast_pages, slow_pages = pages(tmp_path / "fast"), pages(tmp_path / "slow")
    assert fast_pages.keys() == slow_pages.keys()
    if off in ("narrow", "templates", "configs"):  # the rest change the batch fingerprint row
        assert fast_pages == slow_pages


def test_gx_is_restored_after_a_run_and_after_an_error():
    import great_expectations.execution_engine.pandas_execution_engine as engine
    from great_expectations.render.view.view import DefaultJinjaView

    before = (engine.HASH_THRESHOLD, engine.PandasExecutionEngine.get_domain_records, DefaultJinjaView.__init__)
    with gx_speedups():
        assert engine.HASH_THRESHOLD == 0
        assert engine.PandasExecutionEngine.get_domain_records is not before[1]
    with pytest.raises(RuntimeError), gx_speedups():
        raise RuntimeError("boom")
    assert (engine.HASH_THRESHOLD, engine.PandasExecutionEngine.get_domain_records, DefaultJinjaView.__init__) == before
    with pytest.raises(ValueError, match="unknown GX speedup"):
        gx_speedups(["nope"]).__enter__()


def test_our_unchanged_checkpoint_is_not_read_back_but_a_changed_one_outside_the_fix_is(tmp_path, monkeypatch):
    from great_expectations.checkpoint.checkpoint import Checkpoint

    from tasks.validation import SuiteRuns

    original = Checkpoint.is_fresh
    runs = SuiteRuns(parse_spec({**SAMPLE_SPEC, "source": "x.csv"}), str(tmp_path), "tickets@fresh")
    store = runs.context.checkpoint_store
    with gx_speedups(["fresh"]):
        monkeypatch.setattr(store, "get", lambda key: pytest.fail("the checkpoint was read back"))
        assert runs.checkpoint.is_fresh().success
        monkeypatch.undo()
    assert Checkpoint.is_fresh is original
    runs.checkpoint.result_format = "COMPLETE"  # changed after it was added: GX's own check sees it
    assert not runs.checkpoint.is_fresh().success


def test_overlapping_runs_keep_the_fixes_until_the_last_one_ends():
    """Two validations overlapping in threads: the first out must not unpatch GX under the second."""
    import great_expectations.execution_engine.pandas_execution_engine as engine

    original = engine.PandasExecutionEngine.get_domain_records
    first, second = gx_speedups(), gx_speedups(["narrow"])
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert engine.PandasExecutionEngine.get_domain_records is not original
    assert engine.HASH_THRESHOLD != 0  # only `second`'s fix is still needed
    second.__exit__(None, None, None)
    assert engine.PandasExecutionEngine.get_domain_records is original


def test_concurrent_validations_give_each_its_own_results(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tasks.validation import validate_frame

    spec = parse_spec({**SAMPLE_SPEC, "source": "tickets.csv"})
    good, bad = generate_tickets(300, seed=3), bad_frame()
    for frame in (good, bad):
        frame["ticket_id"] = frame["ticket_id"].astype("Int64")
    alone = [validate_frame(f, spec, f"tickets@{i}", str(tmp_path / f"a{i}")) for i, f in enumerate((good, bad))]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(
            lambda i: validate_frame((good, bad)[i], spec, f"tickets@{i}", str(tmp_path / f"t{i}")), range(2)))
    assert together == alone and alone[0][0] and not alone[1][0]


def test_a_gx_run_on_another_thread_keeps_whole_rows_while_ours_narrows():
    """Richer result formats read the other columns of a row; they are never narrowed outside our runs."""
    from concurrent.futures import ThreadPoolExecutor

    import great_expectations as gx
    import great_expectations.expectations as gxe
    import pandas as pd

    frame = pd.DataFrame({"id": [1, 2, 3, 4], "x": [5.0, 50.0, None, 70.0], "y": ["a", "b", "c", "d"]})
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["id"],
                     "include_unexpected_rows": True}

    def run() -> dict:
        context = gx.get_context(mode="ephemeral")
        batch = context.data_sources.add_pandas("p").add_dataframe_asset("a").add_batch_definition_whole_dataframe(
            "all").get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(gxe.ExpectColumnValuesToBeBetween(column="x", min_value=0, max_value=10),
                                result_format=result_format).result
        return {**result, "unexpected_rows": result["unexpected_rows"].to_dict("list")}

    plain = run()
    assert plain["unexpected_index_list"] == [{"x": 50.0, "id": 2}, {"x": 70.0, "id": 4}]
    assert plain["unexpected_rows"]["y"] == ["b", "d"]
    with gx_speedups(), ThreadPoolExecutor(1) as other:
        assert other.submit(run).result() == plain


def test_validate_frame_asks_for_no_result_that_reads_other_columns():
    from tasks.validation import RESULT_FORMAT

    assert not RESULT_FORMAT.get("unexpected_index_column_names") and not RESULT_FORMAT.get("include_unexpected_rows")
    assert RESULT_FORMAT["result_format"] in ("BOOLEAN_ONLY", "BASIC", "SUMMARY")


def _patched_state():
    import great_expectations.execution_engine.pandas_execution_engine as engine
    from great_expectations.render.view.view import DefaultJinjaView

    return engine.HASH_THRESHOLD, engine.PandasExecutionEngine.get_domain_records, DefaultJinjaView.__init__


def _speedup_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "lifecycle.gx_speedups" and r.levelno == logging.WARNING]


def test_every_fix_fits_the_installed_gx():
    """The pinned GX: every fix's version, attribute and signature check passes (so all of them run)."""
    from tasks.gx_speedups import mismatch

    assert {name: mismatch(speedup) for name, speedup in SPEEDUPS.items()} == dict.fromkeys(SPEEDUPS)


def test_a_changed_gx_internal_is_named():
    from tasks.gx_speedups import mismatch

    narrow, fingerprint = SPEEDUPS["narrow"], SPEEDUPS["fingerprint"]
    assert mismatch(replace(narrow, expects=("self", "domain_kwargs", "table"))) == (
        "great_expectations.execution_engine.pandas_execution_engine.PandasExecutionEngine.get_domain_records "
        "takes (self, domain_kwargs)")
    gone = mismatch(replace(narrow, attribute="PandasExecutionEngine.gone"))
    assert gone is not None and gone.endswith("PandasExecutionEngine.gone not found")
    assert str(mismatch(replace(narrow, module="great_expectations.no_such_module"))).endswith("not found")
    assert str(mismatch(replace(fingerprint, expects=str))).endswith("HASH_THRESHOLD is a float")


@pytest.mark.parametrize("how", ["other GX version", "install raises"])
def test_a_fix_that_does_not_fit_runs_plain_gx_with_one_warning(tmp_path, monkeypatch, caplog, how):
    """Another GX release, or a fix that raises while installing: the validation still runs, gives GX's own
    result, leaves GX as it was, and says so once per process."""
    from tasks import gx_speedups as module
    from tasks.validation import validate_frame

    def broken():
        raise ImportError("no such GX internals")

    spec = parse_spec({**SAMPLE_SPEC, "source": "tickets.csv",
                       "expectations": {**SAMPLE_SPEC["expectations"], "max_null_fraction": 0.05}})
    frame = bad_frame()
    plain = validate_frame(frame, spec, "tickets@plain", str(tmp_path / "plain"), speedups=())
    before = _patched_state()
    monkeypatch.setattr(module, "_off", {})  # as in a fresh process
    if how == "other GX version":
        monkeypatch.setattr(module, "gx_version", lambda: "1.99.0")
    else:
        monkeypatch.setitem(module.SPEEDUPS, "templates", replace(module.SPEEDUPS["templates"], install=broken))
    caplog.set_level(logging.WARNING, logger="lifecycle.gx_speedups")

    runs = [validate_frame(frame, spec, "tickets@plain", str(tmp_path / f"run{i}")) for i in range(2)]
    assert runs == [plain, plain]
    assert _patched_state() == before and not any(module._users.values())
    (warning,) = _speedup_warnings(caplog)
    assert warning.startswith("GX speed-ups off, running plain Great Expectations: ")
    if how == "other GX version":
        assert set(module._off) == set(SPEEDUPS)
        assert "narrow (written for great-expectations 1.24.1, found 1.99.0)" in warning
        with gx_speedups():
            assert _patched_state() == before  # nothing installed at all
    else:
        assert set(module._off) == {"templates"}
        assert warning.endswith("templates (install failed: ImportError: no such GX internals)")
        with gx_speedups():  # the fixes that fit still apply
            assert _patched_state()[0] == 0 and _patched_state()[2] is before[2]
    assert len(_speedup_warnings(caplog)) == 1
