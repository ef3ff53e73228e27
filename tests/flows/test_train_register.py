"""The train and register flows end to end: local Dask, a file-backed SQLite MLflow, a file lake.

One module-scoped scenario trains three models on the same 600-row sample and registers each:
a weak one (1 stump) becomes the first champion, the default model beats it and is promoted, and a
second weak one loses and stays challenger. The promotion metric is logloss, which separates these
models reliably on 120 holdout rows (accuracy would be a coin flip between the two weak ones).
"""

from __future__ import annotations

import math

import pytest

from lifecycle.errors import QuarantinedError
from lifecycle.records import ModelVersion, TrainedModel, ValidationReport

WEAK = {"num_boost_round": 1, "max_depth": 1}
WORSE = {"num_boost_round": 2, "max_depth": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from infra_blocks import MlflowTarget, ObjectStore
    from lifecycle.sample import write_sample
    from lifecycle.spec import load_spec
    from tasks.ingest import ingest_dataset
    from tasks.records import save_record

    tmp = tmp_path_factory.mktemp("lifecycle")
    _, spec_path = write_sample(tmp / "raw", rows=600)
    store = ObjectStore(url=f"file://{tmp / 'lake'}")
    mlflow = MlflowTarget(tracking_uri=f"sqlite:///{tmp}/mlflow.db", artifact_location=f"file://{tmp}/artifacts")
    dataset = ingest_dataset(store, load_spec(spec_path))
    save_record(store, dataset)  # as the ingest flow does: register reads the holdout through it
    report = ValidationReport(id="report-ok", dataset=dataset.dataset, dataset_version=dataset.id, success=True,
                              evaluated=9)

    def spec(**train):
        return load_spec(spec_path, overrides={"train": {"metric": "logloss", **train}})

    return dict(spec=spec, store=store, mlflow=mlflow, dataset=dataset, report=report)


@pytest.fixture(scope="module")
def scenario(world, local_compute):
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    from flows.register import register
    from flows.train import train

    w = world
    steps: dict[str, tuple] = {}
    with pytest.MonkeyPatch.context() as mp:
        events = EventsWorker.instance(AssertingEventsClient)
        mp.setattr(EventsWorker, "instance", lambda *_: events)
        for name, overrides in (("weak", WEAK), ("strong", {}), ("worse", WORSE)):
            spec = w["spec"](**overrides)
            trained = train(spec, w["dataset"], w["report"], w["store"], local_compute, w["mlflow"])
            steps[name] = (spec, trained, register(spec, trained, w["store"], w["mlflow"]))
        events.drain()
        emitted = list(events._client.events)
    return dict(steps=steps, events=emitted)


def _aliases(world) -> dict[str, str]:
    model = world["mlflow"].client().get_registered_model("tickets")
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_first_model_becomes_champion(scenario):
    _, trained, first = scenario["steps"]["weak"]
    assert first.version == "1" and first.promoted and first.aliases == ["challenger", "champion"]
    assert first.decision == "promoted: no champion yet (logloss=%.4f)" % trained.metrics["logloss"]
    assert first.champion_version is None and first.champion_value is None


def test_better_model_is_promoted_after_scoring_the_champion_on_the_same_holdout(scenario):
    _, weak, _ = scenario["steps"]["weak"]
    _, strong, second = scenario["steps"]["strong"]
    assert second.version == "2" and second.promoted and second.champion_version == "1"
    # The champion's pyfunc, run on the challenger's holdout, reproduces its own training logloss:
    # the holdout is the same rows, and the pyfunc computes the same features as training did.
    assert math.isclose(second.champion_value, weak.metrics["logloss"], rel_tol=1e-4)
    assert second.challenger_value == strong.metrics["logloss"] < weak.metrics["logloss"]
    assert second.decision.startswith("promoted: logloss")


def test_worse_model_stays_challenger_with_the_decision_recorded(scenario, world):
    _, strong, _ = scenario["steps"]["strong"]
    _, worse, third = scenario["steps"]["worse"]
    assert third.version == "3" and not third.promoted and third.aliases == ["challenger"]
    assert third.decision.startswith("kept champion v2: logloss")
    assert math.isclose(third.champion_value, strong.metrics["logloss"], rel_tol=1e-4)
    assert _aliases(world) == {"champion": "2", "challenger": "3"}
    tags = world["mlflow"].client().get_model_version("tickets", "3").tags
    assert tags["lifecycle.decision"] == third.decision and tags["lifecycle.promoted"] == "false"
    assert tags["lifecycle.trained_model"] == worse.id and tags["lifecycle.run_id"] == worse.run_id
    assert tags["lifecycle.dataset_version"] == world["dataset"].id
    from tasks.records import load_record

    assert load_record(world["store"], ModelVersion, third.id) == third


def test_promotions_are_announced(scenario):
    promoted = [e for e in scenario["events"] if e.event == "lifecycle.model.promoted"]
    ids = [e.resource.id for e in promoted]
    expected = [f"lifecycle.model_version.{scenario['steps'][n][2].id}" for n in ("weak", "strong")]
    assert ids == expected
    registered = [e for e in scenario["events"] if e.event == "lifecycle.model.registered"]
    assert len(registered) == 3


def test_second_calls_are_cached(scenario, world, local_compute):
    from flows.register import register
    from flows.train import train

    spec, trained, second = scenario["steps"]["strong"]
    again = train(spec, world["dataset"], world["report"], world["store"], local_compute, world["mlflow"])
    assert again == trained  # same record, created_at included: nothing was retrained
    assert register(spec, trained, world["store"], world["mlflow"]) == second
    versions = world["mlflow"].client().search_model_versions("name='tickets'")
    assert len(versions) == 3 and _aliases(world) == {"champion": "2", "challenger": "3"}
    from tasks.records import load_record

    assert load_record(world["store"], TrainedModel, trained.id).run_id == trained.run_id


def test_train_refuses_a_quarantined_version(world, local_compute):
    from flows.train import train

    failed = world["report"].model_copy(update={"success": False})
    with pytest.raises(QuarantinedError, match="quarantined"):
        train(world["spec"](), world["dataset"], failed, world["store"], local_compute, world["mlflow"])


def test_register_after_a_lost_record_finds_its_version_again(scenario, world):
    """A crash after registering but before the record was saved must not create a second version."""
    from flows.register import register

    spec, _, third = scenario["steps"]["worse"]
    trained = scenario["steps"]["worse"][1]
    world["store"].delete(third.key)
    again = register(spec, trained, world["store"], world["mlflow"])
    assert (again.id, again.version, again.promoted) == (third.id, "3", False)
    assert len(world["mlflow"].client().search_model_versions("name='tickets'")) == 3


def test_champion_alias_can_be_rolled_back(scenario, world):
    """What the register flow does when publishing a promoted record fails."""
    from tasks.registry import restore_champion, set_champion

    _, _, third = scenario["steps"]["worse"]
    assert set_champion(world["mlflow"], third) == "2"
    assert _aliases(world)["champion"] == "3"
    restore_champion(world["mlflow"], third, "2")
    assert _aliases(world) == {"champion": "2", "challenger": "3"}


def test_a_champion_that_needs_other_columns_cannot_be_scored(scenario, world):
    from lifecycle.errors import LifecycleError
    from tasks.registry import champion_value
    from tasks.training import load_holdout

    spec, weak, _ = scenario["steps"]["weak"]
    holdout = load_holdout(world["store"], spec, world["dataset"])
    assert math.isclose(champion_value("models:/tickets/1", spec, holdout, "logloss"), weak.metrics["logloss"],
                        rel_tol=1e-4)
    with pytest.raises(LifecycleError, match="champion needs column\\(s\\) this dataset lacks: plan"):
        champion_value("models:/tickets/1", spec, holdout.drop(columns=["plan"]), "logloss")
