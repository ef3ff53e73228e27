"""`lifecycle gc` through the CLI on the local profile (LIFECYCLE_HOME in tmp): plan, apply, nothing twice."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.app import app
from cli.gc import parse_age
from lifecycle.errors import LifecycleError
from tests.tasks.test_retention import deploy_from, five_versions, synthetic_sets


@pytest.fixture
def home(tmp_path, monkeypatch, sample_spec):
    """A LIFECYCLE_HOME whose lake has five versions and a model deployed from the first."""
    from infra_blocks.profiles import load_profile

    monkeypatch.setenv("LIFECYCLE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    store = load_profile("local").store
    records, _ = five_versions(store, sample_spec)
    deploy_from(store, records[0])
    return store, records


def _files(store) -> set[str]:
    return {k for k in store.list_keys("datasets/tickets") if "/_delta_log/" not in k}


def test_gc_plans_then_removes_what_only_old_versions_used(home):
    store, records = home
    runner = CliRunner()
    before = _files(store)
    doomed = set(records[1].added_files) | set(records[2].added_files)

    plan = runner.invoke(app, ["gc", "--keep", "2", "--min-age", "0", "--dry-run"])
    assert plan.exit_code == 0, plan.output
    assert f"would remove {len(doomed)} items" in plan.output and "(dry run)" in plan.output
    assert "model tickets v1" in plan.output and "version 0" in plan.output
    assert _files(store) == before

    done = runner.invoke(app, ["gc", "--keep", "2", "--min-age", "0"])
    assert done.exit_code == 0, done.output
    assert f"removed {len(doomed)} items" in done.output and _files(store) == before - doomed

    again = runner.invoke(app, ["gc", "--keep", "2", "--min-age", "0"])
    assert again.exit_code == 0 and "nothing to remove" in again.output


def test_gc_shows_embedding_sets_like_the_other_areas(home):
    """Parts only unkept sets list go with their records; the kept sets are listed with why."""
    store, records = home
    synthetic_sets(store, records)
    runner = CliRunner()
    doomed = set(records[1].added_files) | set(records[2].added_files)  # keep 1: versions 0 and 4 (and 3's file)
    gone = {"embeddings/tickets/set1/part-00000.parquet", "embeddings/tickets/set2/part-00000.parquet",
            "records/embeddings/set1.json", "records/embeddings/set2.json"}

    plan = runner.invoke(app, ["gc", "--keep", "1", "--min-age", "0", "--dry-run"])
    assert plan.exit_code == 0, plan.output
    assert f"would remove {len(doomed) + len(gone)} items" in plan.output
    assert "embeddings" in plan.output and "set0" in plan.output and "set4" in plan.output  # kept, and why
    done = runner.invoke(app, ["gc", "--keep", "1", "--min-age", "0"])
    assert done.exit_code == 0 and f"removed {len(doomed) + len(gone)} items" in done.output
    assert not gone & (set(store.list_keys("embeddings")) | set(store.list_keys("records/embeddings")))


def test_gc_keeps_young_files_by_default_and_refuses_a_bad_age(home):
    store, _ = home
    runner = CliRunner()
    default = runner.invoke(app, ["gc", "--keep", "2"])  # min age 1 h: everything here is minutes old
    assert default.exit_code == 0 and "nothing to remove" in default.output
    assert "younger than 1:00:00" in default.output

    bad = runner.invoke(app, ["gc", "--min-age", "5x"])
    assert bad.exit_code == 1
    assert "--min-age '5x': give a number with a unit" in bad.output and len(bad.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800), ("0", 0),
                                               ("1.5h", 5400)])
def test_ages_read_as_people_write_them(text, seconds):
    assert parse_age(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "5", "h", "-1h", "1w"])
def test_ages_without_a_unit_are_refused(text):
    with pytest.raises(LifecycleError, match="give a number with a unit"):
        parse_age(text)


def test_the_gc_flow_does_the_same_from_the_profile_s_saved_blocks(home):
    """The schedulable flow (flows/gc.py): the profile's block documents, a plan, then the removal."""
    from prefect.artifacts import Artifact

    from flows.gc import gc
    from infra_blocks.profiles import apply_profile

    store, records = home
    apply_profile("local")
    doomed = set(records[1].added_files) | set(records[2].added_files)
    plan = gc(keep=2, min_age_hours=0, dry_run=True, profile="local")
    assert {i.what for i in plan.removed} == doomed and doomed <= _files(store)
    report = gc(keep=2, min_age_hours=0, profile="local")
    assert {i.what for i in report.removed} == doomed and not doomed & _files(store)
    artifact = Artifact.get("gc")
    assert artifact is not None and f"Removed {len(doomed)} items" in str(artifact.data)
