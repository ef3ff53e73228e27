"""`lifecycle search`: category queries find their category through the CLI, on records the stages made.

The records come from the stage flows (ingest → validate → embed → index) run against the local
profile with LIFECYCLE_HOME in tmp, which is what `lifecycle run` leaves behind, without training.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.app import app

QUERIES = [
    ("refund for my invoice", "billing"),
    ("app crashes with error", "technical"),
    ("cannot login password", "account"),
    ("package delivery delayed", "shipping"),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory, local_compute):
    """A LIFECYCLE_HOME whose local profile holds the sample's dataset, embeddings and index records."""
    from flows.embed import embed
    from flows.index import index
    from flows.ingest import ingest
    from flows.validate import validate
    from infra_blocks.profiles import load_profile
    from lifecycle.sample import write_sample
    from lifecycle.spec import load_spec

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIFECYCLE_HOME", str(home))
        targets = load_profile("local")
        spec = load_spec(write_sample(home / "sample", rows=600)[1])
        dataset = ingest(spec, targets.store)
        report = validate(spec, dataset, targets.store)
        embeddings = embed(spec, dataset, report, targets.store, targets.compute)
        record = index(spec, embeddings, targets.store, targets.vectors)
    assert record.rows == 600 and record.uri == str(home / "lancedb")
    return home


def _search(home, *args: str):
    return CliRunner().invoke(app, ["search", *args], env={"LIFECYCLE_HOME": str(home)})


def _cells(output: str, frame: str) -> list[list[str]]:
    """Cells of the rich table's lines framed by `frame` (┃ for the header, │ for the body)."""
    lines = [line for line in output.splitlines() if line.startswith(frame)]
    return [[cell.strip() for cell in line.strip(frame).split(frame)] for line in lines]


@pytest.mark.parametrize(("query", "category"), QUERIES)
def test_search_shows_the_querys_category_in_the_top_5(home, query, category):
    result = _search(home, query)
    assert result.exit_code == 0, result.output
    assert _cells(result.output, "┃") == [["id", "category", "channel", "plan", "distance", "text"]]
    rows = _cells(result.output, "│")
    assert len(rows) == 5
    categories = [r[1] for r in rows]
    assert categories[0] == category and categories.count(category) >= 4, result.output
    distances = [float(r[4]) for r in rows]
    assert distances == sorted(distances)


def test_search_json_with_filter_and_k(home):
    result = _search(home, "refund for my invoice", "--k", "7", "--where", "channel = 'phone'", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 7
    assert {r["metadata"]["channel"] for r in rows} == {"phone"}
    assert all(r["metadata"]["category"] == "billing" for r in rows[:3])
    assert set(rows[0]) == {"id", "text", "metadata", "_distance"}


def test_search_errors_are_one_line(home, tmp_path):
    bad = _search(home, "refund", "--where", "no_such_column = 1")
    assert bad.exit_code == 1 and "invalid filter" in bad.output and "Traceback" not in bad.output
    empty = CliRunner().invoke(app, ["search", "refund"], env={"LIFECYCLE_HOME": str(tmp_path / "fresh")})
    assert empty.exit_code == 1 and "no index yet" in empty.output
