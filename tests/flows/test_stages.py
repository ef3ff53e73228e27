"""The stage table itself: its order, how a stage's inputs are found, and how a run of it reports."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flows import stages
from flows.runner import Call, Input, Stage
from lifecycle.records import DatasetVersion, EmbeddingSet, ModelVersion, TrainedModel, ValidationReport
from tasks.records import save_record


def test_the_table_is_the_dag_in_topological_order():
    assert [s.name for s in stages.STAGES] == ["ingest", "validate", "embed", "index", "train", "register", "deploy"]
    stages.check_order()
    backwards = (stages.BY_NAME["validate"], stages.BY_NAME["ingest"])
    with pytest.raises(ValueError, match="stage validate takes dataset before any stage makes it"):
        stages.check_order(backwards)


def test_every_stage_takes_the_generic_path():
    """Each row has its work, so `produce` is the one find → run → publish path (none does its own)."""
    assert [s.name for s in stages.STAGES if s.work is None] == []
    deploy = stages.BY_NAME["deploy"]
    assert None not in (deploy.require, deploy.record_id, deploy.reuse, deploy.publish)


def test_text_stages_are_skipped_without_a_text_column(sample_spec):
    no_text = sample_spec.model_copy(update={"text_column": None})
    reasons = {s.name: s.skip(no_text) if s.skip else None for s in stages.STAGES}
    assert reasons == {"ingest": None, "validate": None, "embed": "no text column", "index": "no text column",
                       "train": None, "register": None, "deploy": None}


def _version(store, dataset_id: str = "d1") -> DatasetVersion:
    version = DatasetVersion(id=dataset_id, dataset="tickets", source="x.csv", path="datasets/tickets/d1", parts=[],
                             rows=1, bytes=1, schema_={}, spec_hash="h")
    save_record(store, version)
    return version


def test_an_entry_finds_the_dataset_version_through_the_lineage(lake):
    version = _version(lake)
    report = ValidationReport(id="r1", dataset="tickets", dataset_version="d1", success=True, evaluated=1,
                              inputs={"dataset": "d1"})
    trained = TrainedModel(id="t1", dataset="tickets", dataset_version="d1", run_id="run", model_uri="models:/m-1",
                           metrics={"accuracy": 1.0}, primary_metric="accuracy", greater_is_better=True,
                           inputs={"dataset": "d1", "validation": "r1"})
    model = ModelVersion(id="mv1", dataset="tickets", model_name="tickets", version="1", run_id="run",
                         trained_model="t1", aliases=["challenger"], promoted=False, decision="", metric="accuracy",
                         challenger_value=1.0, inputs={"model": "t1"})
    for record in (report, trained, model):
        save_record(lake, record)
    given = stages.given_records(lake, {"model_version": "mv1", "index": None})
    assert given == {"model_version": model, "dataset": version}  # model version → trained model → dataset
    assert stages.given_records(lake, {"validation": "r1"})["dataset"] == version


def _call(spec, store, **records) -> Call:
    return Call(spec, store, dict(records))


def test_inputs_are_passed_picked_made_or_found_in_that_order(lake, sample_spec):
    found, picked = SimpleNamespace(kind="x"), []
    stage = Stage(name="s", record=EmbeddingSet, inputs=(
        Input("dataset", "dataset"),
        Input("model_version", "model", pick=lambda call: picked.append(1) or "champion", missing="no champion"),
        Input("embeddings", "embeddings", optional=True, find=lambda call: found),
        Input("validation", "report", optional=True, wanted=lambda spec: False, find=lambda call: 1 / 0),
    ), blocks=(), flow=lambda **kw: None)
    call = _call(sample_spec, lake)
    args, why = stages._gather(stage, call, {"dataset": "D"}, {"model_version": "this run's"})
    assert why is None and args == {"dataset": "D", "model": "champion", "embeddings": found, "report": None}
    # Made earlier in the run (even as None: skipped) beats finding; passed beats picking.
    args, _ = stages._gather(stage, call, {"dataset": "D", "model_version": "M"}, {"embeddings": None})
    assert args["model"] == "M" and args["embeddings"] is None and picked == [1]
    none = Stage(name="s", record=EmbeddingSet, inputs=stage.inputs[1:2], blocks=(), flow=lambda **kw: None)
    picked_none = Stage(name="s", record=EmbeddingSet, blocks=(), flow=lambda **kw: None, inputs=(
        Input("model_version", "model", pick=lambda call: None, missing="no champion"),))
    assert stages._gather(picked_none, call, {}, {}) == ({}, "no champion")
    assert stages._gather(none, call, {}, {})[1] is None


def test_a_stage_without_its_required_input_says_which():
    stage = stages.BY_NAME["index"]
    call = Call(SimpleNamespace(name="tickets", text_column="text"), None, {})
    assert stages._gather(stage, call, {}, {"embeddings": None}) == ({}, "no embeddings")


def test_the_table_in_the_docstring_is_the_table():
    """The module's docstring shows the table to readers; it must not drift from the rows."""
    rows = [line.strip("|").split("|") for line in stages.__doc__.splitlines()
            if line.startswith("| ") and not line.startswith("| stage ")]
    shown = {cells[0].strip(): cells for cells in rows}
    assert list(shown) == [s.name for s in stages.STAGES]
    for stage in stages.STAGES:
        _, kinds, blocks, record, skipped = (c.strip() for c in shown[stage.name])
        assert [k.split(" ")[0] for k in kinds.split(", ") if k != "-"] == [i.kind for i in stage.inputs]
        assert [b for b in blocks.split(", ") if b != "-"] == list(stage.blocks)
        assert record == stage.record.__name__
        assert bool(skipped) == (stage.skip is not None or any(i.missing for i in stage.inputs))
