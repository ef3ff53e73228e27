"""The DAG, declared once: the table of stages that the lifecycle flow and every deployment entry point run.

    ingest ─→ validate ─→ embed ─┬─→ index ───────────────┐
                                 └─→ train ─→ register ───┴─→ deploy

| stage    | input records (kinds)                     | blocks                   | record           | skipped when   |
|----------|-------------------------------------------|--------------------------|------------------|----------------|
| ingest   | -                                         | -                        | DatasetVersion   |                |
| validate | dataset                                   | -                        | ValidationReport |                |
| embed    | dataset, validation                       | compute                  | EmbeddingSet     | no text column |
| index    | embeddings                                | vectors                  | IndexVersion     | no text column |
| train    | dataset, validation, embeddings (if used) | compute, mlflow          | TrainedModel     |                |
| register | model                                     | mlflow                   | ModelVersion     |                |
| deploy   | model_version (the champion), index       | mlflow, vectors, serving | Deployment       | no champion    |

Ingest writes, audits and commits (write–audit–publish: a landing that fails its audit never enters the
Delta table and fails ingest); validate publishes the report that audit left, so the event chain below
is unchanged.

Each row (`flows.runner.Stage`) lives next to its flow in `flows/<stage>.py` with its record id and
work; this module orders them and runs any part of the table (`run_stages`):
- the lifecycle flow runs all of it (flows/lifecycle.py);
- the deployment entry points (flows/triggers.py) run a part from record ids: `SEGMENTS` is the event
  chain of prefect.yaml (validated → build, promoted → deploy) and every stage is also a deployment of
  its own, whose parameters are the ids of its input records (`entry_params`).
Both go through the same path: find the input records, require the inputs, run each stage flow (which
finds its own record or does the work and publishes it), and note what ran, was cached or skipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from flows.deploy import STAGE as DEPLOY
from flows.embed import STAGE as EMBED
from flows.index import STAGE as INDEX
from flows.ingest import STAGE as INGEST
from flows.register import STAGE as REGISTER
from flows.runner import Call, Stage
from flows.train import STAGE as TRAIN
from flows.validate import STAGE as VALIDATE
from infra_blocks import ObjectStore
from infra_blocks.profiles import Targets
from lifecycle import progress
from lifecycle.errors import LifecycleError
from lifecycle.records import (
    RECORD_TYPES,
    DatasetVersion,
    ModelVersion,
    Record,
    ValidationReport,
    utcnow,
)
from lifecycle.spec import DatasetSpec

R = TypeVar("R", bound=Record)

PROMOTED_EVENT = ModelVersion.promoted_event

STAGES: tuple[Stage[Any], ...] = (INGEST, VALIDATE, EMBED, INDEX, TRAIN, REGISTER, DEPLOY)
BY_NAME = {stage.name: stage for stage in STAGES}

# The parameter that carries a record's id into a deployment entry point, per record kind.
ID_PARAMS = {"dataset": "dataset_version", "validation": "validation", "embeddings": "embeddings", "index": "index",
             "model": "trained", "model_version": "model_version"}
KINDS = {param: kind for kind, param in ID_PARAMS.items()}


@dataclass(frozen=True)
class Segment:
    """A part of the table that one deployment runs, and the event that starts it (prefect.yaml triggers).

    Attributes:
        deployment: the deployment's name.
        stages: the stages it runs, in table order.
        event: the event its trigger listens for (None: started by the `landed` flow).
        kind: the kind of record that event announces; its id is the run's parameter.
        chain: its runs tag their work `lifecycle-chain`, so the next trigger fires.
    """

    deployment: str
    stages: tuple[str, ...]
    event: str | None = None
    kind: str | None = None
    chain: bool = True


SEGMENTS: tuple[Segment, ...] = (
    Segment("ingest-validate", ("ingest", "validate")),
    Segment("build", ("embed", "index", "train", "register"), ValidationReport.event, "validation"),
    Segment("deploy", ("deploy",), PROMOTED_EVENT, "model_version", chain=False),
)


def segment(deployment: str) -> Segment:
    return next(s for s in SEGMENTS if s.deployment == deployment)


def entry_params(stage: Stage[Any]) -> dict[str, bool]:
    """The id parameters of a stage's own deployment (→ required?). The dataset version is found from
    any other input's lineage, so it is a parameter only where it is the sole input."""
    inputs = [i for i in stage.inputs if not (i.kind == "dataset" and len(stage.inputs) > 1)]
    return {ID_PARAMS[i.kind]: not i.optional for i in inputs}


def check_order(stages: Iterable[Stage[Any]] = STAGES) -> None:
    """Every input record is made by an earlier stage (the table is in topological order)."""
    made: set[str] = set()
    for stage in stages:
        late = [i.kind for i in stage.inputs if i.kind not in made]
        if late:
            raise ValueError(f"stage {stage.name} takes {', '.join(late)} before any stage makes it")
        made.add(stage.record.kind)


check_order()


class StageResult(BaseModel):
    stage: str
    status: str = Field(description="ran | cached | skipped (why)")
    seconds: float
    record_id: str | None = None


@dataclass
class StagesRun:
    """What a run of (part of) the table saw and made: records by kind, and one result per stage."""

    records: dict[str, Record | None] = field(default_factory=dict)
    results: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0

    def get(self, cls: type[R]) -> R:
        record = self.maybe(cls)
        if record is None:
            why = next((r.status for r in self.results if BY_NAME[r.stage].record is cls), "not run")
            raise LifecycleError(f"no {cls.kind} record: {why}")
        return record

    def maybe(self, cls: type[R]) -> R | None:
        record = self.records.get(cls.kind)
        return record if isinstance(record, cls) else None


def _gather(stage: Stage[Any], call: Call, given: dict[str, Record], made: dict[str, Record | None]
            ) -> tuple[dict[str, Record | None], str | None]:
    """The stage flow's record arguments, or why the stage is skipped (a required input is absent).

    An input is, in this order: not wanted by the spec (None), passed to the run, picked by the stage
    (the champion), made earlier in this run, or found by the stage (started alone).
    """
    args: dict[str, Record | None] = {}
    for inp in stage.inputs:
        if inp.wanted is not None and not inp.wanted(call.spec):
            record = None
        elif inp.kind in given:
            record = given[inp.kind]
        elif inp.pick is not None:
            record = inp.pick(call)
        elif inp.kind in made:
            record = made[inp.kind]
        else:
            record = inp.find(call) if inp.find is not None else None
        if record is None and not inp.optional:
            return {}, inp.missing or f"no {inp.kind}"
        args[inp.param] = record
    return args, None


def run_stages(spec: DatasetSpec, targets: Targets, names: Iterable[str] | None = None,
               given: dict[str, Record] | None = None) -> StagesRun:
    """Run the table's stages (all, or those named) in table order as subflows of the calling flow.

    Args:
        given: input records passed in (by kind); the stages that make them are not run.
    """
    from flows.subflows import without_subflow_heartbeat

    wanted = set(names) if names is not None else set(BY_NAME)
    unknown = wanted - set(BY_NAME)
    if unknown:
        raise ValueError(f"no such stage: {', '.join(sorted(unknown))}")
    t0, started_at = time.perf_counter(), utcnow()
    given = dict(given or {})
    made: dict[str, Record | None] = {}
    run = StagesRun()
    for stage in (s for s in STAGES if s.name in wanted):
        progress.stage_started(stage.name)
        blocks = {role: getattr(targets, role) for role in stage.blocks}
        call = Call(spec, targets.store, {**given, **made}, tuple(blocks.values()))
        why = stage.skip(spec) if stage.skip is not None else None
        args: dict[str, Record | None] = {}
        if why is None:
            args, why = _gather(stage, call, given, made)
        if why is not None:
            made[stage.record.kind] = None
            run.results.append(StageResult(stage=stage.name, status=f"skipped ({why})", seconds=0.0))
            progress.stage_finished(stage.name, "skipped", 0.0)
            continue
        s0 = time.perf_counter()
        with without_subflow_heartbeat():
            record = stage.flow(spec=spec, store=targets.store, **args, **blocks)
        seconds = time.perf_counter() - s0
        status = "cached" if record.created_at < started_at else "ran"
        made[stage.record.kind] = record
        run.results.append(StageResult(stage=stage.name, status=status, seconds=round(seconds, 3),
                                       record_id=record.id))
        progress.stage_finished(stage.name, status, seconds)
    run.records = {**given, **made}
    run.seconds = round(time.perf_counter() - t0, 3)
    return run


def dataset_of(store: ObjectStore, record: Record) -> DatasetVersion:
    """The dataset version a record was made from, found by walking its lineage (`inputs`)."""
    from tasks.records import load_record

    seen = record
    while not isinstance(seen, DatasetVersion):
        if "dataset" in seen.inputs:
            return load_record(store, DatasetVersion, seen.inputs["dataset"])
        kind = next((k for k in seen.inputs if k in RECORD_TYPES), None)
        if kind is None:
            raise LifecycleError(f"{seen.kind} record {seen.id}: its lineage names no dataset version")
        seen = load_record(store, RECORD_TYPES[kind], seen.inputs[kind])
    return seen


def given_records(store: ObjectStore, ids: dict[str, str | None]) -> dict[str, Record]:
    """The records an entry point was started with (parameter → id), by kind, and their dataset version."""
    from tasks.records import load_record

    given: dict[str, Record] = {KINDS[p]: load_record(store, RECORD_TYPES[KINDS[p]], i) for p, i in ids.items() if i}
    if given and "dataset" not in given:
        given["dataset"] = dataset_of(store, next(iter(given.values())))
    return given
