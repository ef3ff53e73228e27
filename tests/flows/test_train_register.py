"""The train and register flows end to end: local Dask, a real `mlflow server` (SQLite), a file lake.

One module-scoped scenario trains three models on the same 600-row sample and registers each:
a weak one (1 stump) becomes the first champion, the default model beats it and is promoted, and a
second weak one loses and stays challenger. The promotion metric is logloss, which separates these
models reliably on 120 holdout rows (accuracy would be a coin flip between the two weak ones).
The last tests move the champion by hand (`lifecycle promote` / `rollback`) on the same registry.
"""

from __future__ import annotations

import json
import math

import pytest

from lifecycle.errors import QuarantinedError
from lifecycle.records import ModelVersion, TrainedModel, ValidationReport

SCENARIO_RULE = {"model": "xgboost", "require_beats_baseline": False}
WEAK = {"num_boost_round": 1, "max_depth": 1}
WORSE = {"num_boost_round": 2, "max_depth": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server):
    import yaml

    from infra_blocks import ObjectStore
    from lifecycle.sample import write_sample
    from lifecycle.spec import load_spec
    from tasks.ingest import ingest_dataset
    from tasks.records import save_record

    tmp = tmp_path_factory.mktemp("lifecycle")
    _, spec_path = write_sample(tmp / "raw", rows=600)
    # Three xgboost models judged by the champion rule alone (the family choice and the baseline gate
    # have their own tests: tests/tasks/test_model_family.py and the end of this module). In the file
    # too: `lifecycle promote --spec FILE` judges with it.
    raw = yaml.safe_load(spec_path.read_text())
    raw["train"] = {**(raw.get("train") or {}), **SCENARIO_RULE}
    spec_path.write_text(yaml.safe_dump(raw))
    store = ObjectStore(url=f"file://{tmp / 'lake'}")
    mlflow = mlflow_server.target()
    dataset = ingest_dataset(store, load_spec(spec_path))
    save_record(store, dataset)  # as the ingest flow does: register reads the holdout through it
    report = ValidationReport(id="report-ok", dataset=dataset.dataset, dataset_version=dataset.id, success=True,
                              evaluated=9)

    def spec(**train):
        return load_spec(spec_path, overrides={"train": {"metric": "logloss", **SCENARIO_RULE, **train}})

    return dict(spec=spec, store=store, mlflow=mlflow, dataset=dataset, report=report, spec_path=spec_path, tmp=tmp)


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
    assert first.decision.startswith("promoted: no champion yet (logloss=%.4f); " % trained.metrics["logloss"])
    # The gate is off in this scenario, but the decision says where the model stands.
    assert first.decision.endswith("(not required)") and first.baseline_value is not None
    assert first.baseline_value == trained.baseline_metrics["logloss"]
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


def test_versions_point_at_their_logged_model_and_run(scenario, world):
    """Registered through the client API: each version names the run and logged model it came from."""
    client = world["mlflow"].client()
    for _, trained, registered in scenario["steps"].values():
        mv = client.get_model_version("tickets", registered.version)
        assert mv.source == trained.model_uri and mv.run_id == trained.run_id
        listed = json.loads(client.get_logged_model(trained.model_uri.removeprefix("models:/"))
                            .tags["mlflow.modelVersions"])
        mine = [e for e in listed if e["name"] == "tickets"]
        assert mine == [{"name": "tickets", "version": int(registered.version)}]


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


# --- the champion moved by hand: `lifecycle promote` / `lifecycle rollback` (they run last: they move it) ---

def _profile(world) -> str:
    """A profile YAML pointing the CLI at this module's lake and MLflow server."""
    import yaml

    path = world["tmp"] / "profile.yaml"
    path.write_text(yaml.safe_dump({
        "store": {"url": world["store"].url}, "compute": {"mode": "local"},
        "mlflow": {"tracking_uri": world["mlflow"].tracking_uri},
        "vectors": {"uri": str(world["tmp"] / "lancedb")}, "serving": {"workdir": str(world["tmp"] / "serving")},
    }))
    return str(path)


def _cli(*args: str):
    from typer.testing import CliRunner

    from cli.app import app

    return CliRunner().invoke(app, list(args))


def test_register_audits_each_automatic_promotion(scenario, world):
    from tasks.promotion import audits

    trail = audits(world["store"], "tickets")
    assert [(a.action, a.version, a.previous, a.moved) for a in trail] == [("register", "1", None, True),
                                                                          ("register", "2", "1", True)]
    # Linked like a list from the champion: v2 carries its audit, which names the promotion behind it.
    first, second = trail
    assert "promotion" not in first.inputs and second.inputs["promotion"] == first.id
    client = world["mlflow"].client()
    assert client.get_model_version("tickets", "2").tags["lifecycle.champion_audit"] == second.id
    assert client.get_model_version("tickets", "2").tags["lifecycle.record"] == scenario["steps"]["strong"][2].id


def test_promote_refuses_a_worse_version_and_records_why(scenario, world):
    from tasks.promotion import judging_spec, promote_version
    from tasks.records import load_record
    from tasks.specs import register_spec

    register_spec(world["store"], world["spec"]())  # what `lifecycle register` does: the spec to judge with
    spec = judging_spec(world["store"], world["mlflow"], "tickets", "3")
    audit = promote_version(spec, world["store"], world["mlflow"], "3", actor="alice")
    assert not audit.moved and (audit.action, audit.version, audit.previous) == ("promote", "3", "2")
    assert audit.decision.startswith("kept champion v2: logloss")
    assert _aliases(world) == {"champion": "2", "challenger": "3"}
    assert load_record(world["store"], type(audit), audit.id) == audit
    client = world["mlflow"].client()
    tags = client.get_model_version("tickets", "3").tags
    assert tags["lifecycle.decision"] == audit.decision
    assert tags[f"lifecycle.audit.{audit.id}"] == f"promote by alice: {audit.decision}"
    assert client.get_registered_model("tickets").tags["lifecycle.champion_decision"].startswith(audit.id)


def test_cli_rollback_restores_the_previous_champion(scenario, world):
    from tasks.promotion import champion_record

    out = _cli("rollback", "tickets", "--reason", "latency regression", "--profile", _profile(world))
    assert out.exit_code == 0, out.output
    assert "tickets@champion → v1: rolled back: v1 is the champion again, v2 demoted (latency regression)" in out.output
    assert _aliases(world)["champion"] == "1"
    weak = scenario["steps"]["weak"][2]
    assert champion_record(world["store"], world["mlflow"], "tickets") == weak  # what a deploy now serves
    demoted = world["mlflow"].client().get_model_version("tickets", "2").tags
    assert any(v.startswith("demoted: v1 replaced it (rollback") for k, v in demoted.items()
               if k.startswith("lifecycle.audit."))


def test_cli_promotes_a_better_version_and_rollback_walks_the_chain(scenario, world):
    from tasks.promotion import audits

    profile = _profile(world)
    out = _cli("promote", "tickets", "2", "--spec", str(world["spec_path"]), "--profile", profile)
    assert out.exit_code == 0, out.output
    assert _aliases(world)["champion"] == "2"
    last = audits(world["store"], "tickets")[-1]
    assert (last.action, last.version, last.previous, last.moved) == ("promote", "2", "1", True)
    assert last.decision.startswith("promoted: logloss") and "vs champion v1" in last.decision
    # Refused: the CLI exits 1 with the decision on one line, and the champion stays.
    refused = _cli("promote", "tickets", "3", "--spec", str(world["spec_path"]), "--profile", profile)
    assert refused.exit_code == 1 and "not promoted: kept champion v2" in refused.output
    # v2 replaced v1 when promoted; v1 was the first champion: a second rollback has nowhere to go.
    assert _cli("rollback", "tickets", "--profile", profile).exit_code == 0
    assert _aliases(world)["champion"] == "1"
    from tasks.promotion import champion_history

    moves = [(a.action, a.version, a.previous) for a in champion_history(world["store"], world["mlflow"], "tickets")]
    assert moves == [("rollback", "1", "2"), ("register", "1", None)]  # back to v1's own promotion, then none
    stuck = _cli("rollback", "tickets", "--profile", profile)
    assert stuck.exit_code == 1 and "names no champion before it" in stuck.output
    assert _aliases(world)["champion"] == "1"


def test_forced_promotion_says_so_and_unknown_versions_fail_in_one_line(scenario, world):
    from lifecycle.errors import LifecycleError
    from tasks.promotion import promote_version

    spec = world["spec"]()
    audit = promote_version(spec, world["store"], world["mlflow"], "3", force=True, reason="hotfix", actor="bob")
    assert audit.moved and audit.previous == "1" and "--force" in audit.decision and "hotfix" in audit.decision
    assert _aliases(world)["champion"] == "3"
    with pytest.raises(LifecycleError, match="model tickets has no version '9'"):
        promote_version(spec, world["store"], world["mlflow"], "9")


# --- the baseline gate: a model must beat the plain baseline of its own run to become champion -------

def _own_dataset(world, name: str, frame, **spec):
    """A dataset of its own (its own registered model) ingested into the world's lake."""
    from lifecycle.spec import parse_spec
    from tasks.ingest import ingest_dataset
    from tasks.records import save_record

    csv = world["tmp"] / f"{name}.csv"
    frame.to_csv(csv, index=False)
    parsed = parse_spec({"name": name, "source": str(csv), "id_column": "id", "label_column": "label", **spec})
    dataset = ingest_dataset(world["store"], parsed)
    save_record(world["store"], dataset)
    report = world["report"].model_copy(update={"dataset": name, "dataset_version": dataset.id})
    return parsed, dataset, report


def _noise_embeddings(world, dataset, frame, dim: int = 384):
    """An embedding set whose vectors carry nothing (a poor encoder): the text signal reaches only TF-IDF.
    384-d, as MiniLM's: the logged pyfunc embeds its input example with the real encoder."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lifecycle.records import EmbeddingSet

    vectors = np.random.default_rng(5).normal(size=(len(frame), dim)).astype(np.float32)
    key = f"embeddings/{dataset.dataset}/noise/part-00000.parquet"
    world["store"].write_bytes(key, b"")
    pq.write_table(pa.table({"id": frame["id"].to_numpy(),
                             "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)}),
                   world["store"].path(key))
    return EmbeddingSet(id=f"noise-{dataset.id}", dataset=dataset.dataset, dataset_version=dataset.id, model="noise",
                        dim=dim, rows=len(frame), parts=[key], encoded_rows=len(frame))


def test_text_driven_labels_baseline_wins_model_registered_not_promoted(world, local_compute):
    import numpy as np
    import pandas as pd

    from cli.app import _detail
    from cli.models import registered_fact
    from flows.register import register
    from flows.train import train

    rng = np.random.default_rng(11)
    vocab = {"refund": ["invoice", "refund", "charge"], "crash": ["error", "crash", "timeout"],
             "login": ["password", "login", "locked"]}
    labels = rng.choice(list(vocab), size=600)
    frame = pd.DataFrame({"id": np.arange(600), "label": labels,
                          "text": [" ".join(rng.choice(vocab[v], size=2)) + " please help" for v in labels],
                          "x1": rng.normal(size=600), "x2": rng.normal(size=600)})
    spec, dataset, report = _own_dataset(world, "textdriven", frame, task="multiclass", text_column="text",
                                         numeric_features=["x1", "x2"],
                                         train={"use_text_embeddings": True, "require_beats_baseline": True,
                                                "num_boost_round": 30, "model": "xgboost"})
    trained = train(spec, dataset, report, world["store"], local_compute, world["mlflow"],
                    _noise_embeddings(world, dataset, frame))
    assert trained.baseline_metrics["accuracy"] > 0.95 > trained.metrics["accuracy"] + 0.2
    assert "tfidf(text)" in trained.baseline
    record = register(spec, trained, world["store"], world["mlflow"])
    assert record.version == "1" and not record.promoted and record.aliases == ["challenger"]
    assert record.beats_baseline is False and record.baseline_value == trained.baseline_metrics["accuracy"]
    verdict = (f"does not beat baseline (accuracy {trained.metrics['accuracy']:.4f} vs "
               f"{trained.baseline_metrics['accuracy']:.4f})")
    assert record.baseline_verdict == verdict
    assert record.decision.startswith(f"not promoted: {verdict}; champion check: no champion yet")
    client = world["mlflow"].client()
    assert dict(client.get_registered_model("textdriven").aliases) == {"challenger": "1"}
    tags = client.get_model_version("textdriven", "1").tags
    assert tags["lifecycle.promoted"] == "false" and tags["lifecycle.baseline_verdict"] == verdict
    # What the summary table and `lifecycle status` show.
    assert registered_fact(record) == f"textdriven v1 · challenger (not promoted) · {verdict}"
    assert _detail(record) == registered_fact(record)
    assert f"baseline {trained.baseline_metrics['accuracy']:.4f}" in _detail(trained)
    run = client.get_run(trained.run_id).data
    assert run.metrics["baseline_accuracy"] == trained.baseline_metrics["accuracy"]
    plots = {f.path for f in client.list_artifacts(trained.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/baseline_confusion_matrix.png"} <= plots


def test_numeric_interactions_model_wins_and_is_promoted(world, local_compute):
    import numpy as np
    import pandas as pd

    from cli.models import registered_fact
    from flows.register import register
    from flows.train import train

    rng = np.random.default_rng(12)
    x1, x2 = rng.normal(size=800), rng.normal(size=800)
    frame = pd.DataFrame({"id": np.arange(800), "x1": x1, "x2": x2, "x3": rng.normal(size=800),
                          "label": np.where(x1 * x2 > 0, "same", "opposite")})  # XOR: no linear model sees it
    spec, dataset, report = _own_dataset(world, "interactions", frame, task="binary",
                                         numeric_features=["x1", "x2", "x3"],
                                         train={"require_beats_baseline": True, "baseline_margin": 0.1})
    trained = train(spec, dataset, report, world["store"], local_compute, world["mlflow"])
    assert trained.metrics["accuracy"] > 0.85 and trained.baseline_metrics["accuracy"] < 0.65
    record = register(spec, trained, world["store"], world["mlflow"])
    assert record.promoted and record.aliases == ["challenger", "champion"] and record.beats_baseline
    assert trained.family == record.family == "xgboost"  # train.model: auto picked it (it beats the baseline)
    gain = trained.metrics["accuracy"] - trained.baseline_metrics["accuracy"]
    assert record.baseline_verdict.startswith(f"beats baseline by {gain:.4f}")
    assert record.decision.startswith("promoted: no champion yet") and record.decision.endswith(record.baseline_verdict)
    assert registered_fact(record).startswith("interactions v1 · champion · beats baseline by ")

