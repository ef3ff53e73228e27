"""prefect.yaml against the stage table (flows/stages.py): one deployment per stage whose parameters are
the ids of the stage's input records, and triggers that start each part of the table on the event of
the record it takes, so that the chain runs the whole DAG in table order."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from flows.stages import ID_PARAMS, SEGMENTS, STAGES, entry_params
from lifecycle.records import RECORD_TYPES
from tasks.orchestration import CHAIN_TAG

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def load_flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_each_stage_is_a_deployment_whose_parameters_are_its_input_ids(stage):
    dep = DEPLOYMENTS[stage.name]
    assert dep["entrypoint"] == f"flows.triggers.{stage.name}_entry"
    flow = load_flow(dep["entrypoint"])
    assert flow.name == f"stage-{stage.name}"
    params = inspect.signature(flow.fn).parameters
    expected = entry_params(stage) or {"dataset": True, "source": False}  # ingest starts from a dataset's spec
    assert list(params) == [*expected, "profile"]
    for name, required in expected.items():
        assert (params[name].default is inspect.Parameter.empty) is required, name
    assert inspect.signature(flow.fn).return_annotation in (stage.record.__name__, stage.record)


def test_segments_cover_the_table_in_order():
    """ingest-validate, build and deploy together are the DAG, each stage once, in table order."""
    assert [name for seg in SEGMENTS for name in seg.stages] == [s.name for s in STAGES]


def record_triggers() -> dict[str, dict]:
    return {name: t for name, dep in DEPLOYMENTS.items() for t in dep.get("triggers", [])
            if t["expect"][0].startswith("lifecycle.") and name != "landed"}


def test_triggers_start_each_segment_on_the_event_of_the_record_it_takes():
    triggers = record_triggers()
    started = [seg for seg in SEGMENTS if seg.event is not None]
    assert set(triggers) == {seg.deployment for seg in started}
    for seg in started:
        trigger = triggers[seg.deployment]
        assert trigger["expect"] == [seg.event]
        assert seg.kind in RECORD_TYPES
        assert trigger["match"] == {"prefect.resource.id": f"lifecycle.{seg.kind}.*"}
        assert trigger["match_related"] == {"prefect.resource.id": f"prefect.tag.{CHAIN_TAG}"}
        assert trigger["parameters"] == {ID_PARAMS[seg.kind]: "{{ event.payload.record.id }}"}
        # The first stage of the segment takes that record (the rest of its inputs follow from it).
        first = next(s for s in STAGES if s.name == seg.stages[0])
        assert seg.kind in [i.kind for i in first.inputs]


def test_segment_entry_points_take_the_id_their_trigger_passes():
    for seg in SEGMENTS:
        params = inspect.signature(load_flow(DEPLOYMENTS[seg.deployment]["entrypoint"]).fn).parameters
        if seg.kind is not None:
            assert ID_PARAMS[seg.kind] in params
        assert params["profile"].default is None


def test_the_record_a_trigger_passes_is_announced_by_the_segment_before():
    """build listens for validate's record; deploy for the promotion register announces."""
    from flows import stages
    from tasks.registry import PROMOTED_EVENT

    assert stages.PROMOTED_EVENT == PROMOTED_EVENT
    by_name = {s.name: s for s in STAGES}
    for before, seg in zip(SEGMENTS, SEGMENTS[1:]):
        last = by_name[before.stages[-1]]
        assert seg.kind == last.record.kind
        assert seg.event in (last.record.event, PROMOTED_EVENT)
