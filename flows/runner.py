"""One stage, declared once: what it takes, what it makes, and the one path every stage call follows.

A `Stage` is a row of the table in flows/stages.py. Its stage-specific parts are small functions over
tasks (the record id, the work, a precondition, a custom publish); everything else, the part that
used to be copied into each flow, is `produce`:

    require the inputs → find the record by its content id → (reuse it) or run the work → publish

Why this shape:
- Every stage flow did the same find → run → publish steps with its own spelling of them (seven copies,
  each with its own way of logging a reuse). One path means one place that decides when stored work
  stands, and a new stage is a row plus its tasks.
- The stage flows stay real `@flow` functions with typed parameters (tests, the lifecycle and the
  deployment entry points call them; Prefect validates their parameters): each is one call of
  `produce` with its arguments sorted into records and blocks (`Call`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import Record
from lifecycle.spec import DatasetSpec

R = TypeVar("R", bound=Record)
B = TypeVar("B")


@dataclass
class Call:
    """One stage call: the spec, the store, its input records by kind and the blocks it was given."""

    spec: DatasetSpec
    store: ObjectStore
    records: dict[str, Record | None] = field(default_factory=dict)
    blocks: tuple[Any, ...] = ()

    def maybe(self, cls: type[R]) -> R | None:
        """The input record of `cls`'s kind, or None when the stage was given none."""
        record = self.records.get(cls.kind)
        if record is not None and not isinstance(record, cls):
            raise TypeError(f"input {cls.kind!r} is a {type(record).__name__}, not a {cls.__name__}")
        return record

    def get(self, cls: type[R]) -> R:
        record = self.maybe(cls)
        if record is None:
            raise LifecycleError(f"{self.spec.name}: no {cls.kind} record given")
        return record

    def block(self, cls: type[B]) -> B:
        """The block of type `cls` (each stage takes at most one block of a type)."""
        for block in self.blocks:
            if isinstance(block, cls):
                return block
        raise TypeError(f"no {cls.__name__} block given")


@dataclass(frozen=True)
class Input:
    """An input record of a stage.

    Attributes:
        kind: the record kind (`Record.kind`); the stage of the table that makes it comes earlier.
        param: the stage flow's parameter that takes it.
        optional: the stage runs without it (None).
        wanted: when given and false for the spec, the stage gets None (train without text features).
        pick: how a DAG run chooses it instead of the record this run made (deploy: the champion).
        find: how a stage started alone finds it when its id was not passed (may raise).
        missing: why the stage is skipped when a required input is absent (default "no <kind>").
    """

    kind: str
    param: str
    optional: bool = False
    wanted: Callable[[DatasetSpec], bool] | None = None
    pick: Callable[[Call], Record | None] | None = None
    find: Callable[[Call], Record | None] | None = None
    missing: str | None = None


@dataclass(frozen=True)
class Stage(Generic[R]):
    """A row of the stage table.

    Attributes:
        name: stage name: its flow, its deployment (`stage-<name>/<name>`), its line in summaries.
        record: the record type it returns.
        inputs: its input records, in the order of the DAG.
        blocks: the `Targets` fields (besides the store) its flow takes, by the same parameter names.
        flow: the stage flow (`flows/<name>.py`).
        work: the stage's own work given the call and the record id; returns the unpublished record.
        record_id: the content id of the record for this call; None: the work itself finds repeats.
        require: refuses inputs the stage must not use (a quarantined version).
        reuse: whether a stored record still stands (an index whose table version still exists).
        publish: replaces the plain publish (register moves the champion with it).
        accept: applied to the record found or made before it is returned (a failed verdict raises).
        skip: why the DAG skips the stage for a spec (None: it runs).
    """

    name: str
    record: type[R]
    inputs: tuple[Input, ...]
    blocks: tuple[str, ...]
    flow: Callable[..., R]
    work: Callable[[Call, str | None], R] | None = None
    record_id: Callable[[Call], str] | None = None
    require: Callable[[Call], None] | None = None
    reuse: Callable[[Call, R], bool] | None = None
    publish: Callable[[Call, R], None] | None = None
    accept: Callable[[Call, R], R] | None = None
    skip: Callable[[DatasetSpec], str | None] | None = None


def produce(stage: Stage[R], call: Call) -> R:
    """The generic stage path: require the inputs → find the record → run unless it stands → publish."""
    from prefect.logging import get_run_logger

    from tasks.records import find_record, publish_record

    if stage.work is None:
        raise TypeError(f"stage {stage.name} has no generic path")
    if stage.require is not None:
        stage.require(call)
    record_id = stage.record_id(call) if stage.record_id is not None else None
    record = find_record(call.store, stage.record, record_id) if record_id is not None else None
    if record is not None and (stage.reuse is None or stage.reuse(call, record)):
        get_run_logger().info("%s %s: unchanged, using %s %s", stage.name, call.spec.name, stage.record.kind,
                              record.id)
    else:
        record = stage.work(call, record_id)
        if stage.publish is not None:
            stage.publish(call, record)
        else:
            publish_record(call.store, record)
    return stage.accept(call, record) if stage.accept is not None else record
