"""prefect.yaml read as data: every deployment loads, is typed and enforced, and every trigger listens for
an event the code really emits, with parameters its flow really has. (The slow tests run it for real.)"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

from cli.server import POOLS
from lifecycle.records import ValidationReport
from lifecycle.spec import DatasetSpec
from tasks.landing import LANDED_EVENT
from tasks.orchestration import CHAIN_TAG
from tasks.registry import PROMOTED_EVENT

REPO = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((REPO / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in CONFIG["deployments"]}


def load_flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint)


def test_deployments_cover_every_stage_the_chain_and_the_lifecycle():
    assert set(DEPLOYMENTS) == {"nightly", "watch-landing", "landed", "ingest-validate", "build", "ingest", "validate",
                                "embed", "index", "train", "register", "deploy", "gpu-docker", "gpu-k8s"}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_is_typed_enforced_and_its_parameters_fit(name):
    from prefect.utilities.callables import parameter_schema

    dep = DEPLOYMENTS[name]
    assert dep["enforce_parameter_schema"] is True
    assert ":" not in dep["entrypoint"], "module paths: a script's folder on sys.path shadows the lifecycle package"
    assert dep["work_pool"]["name"] in POOLS
    flow = load_flow(dep["entrypoint"])
    schema = parameter_schema(flow).model_dump()
    assert schema["properties"], f"{name}: no parameters"
    params = inspect.signature(flow.fn).parameters
    assert "profile" in params and params["profile"].default is None  # None: the server's default profile
    for key in dep.get("parameters", {}):
        assert key in params, f"{name}: parameter {key!r} is not one of {flow.name}'s"
    if "spec" in dep.get("parameters", {}):
        DatasetSpec.model_validate(dep["parameters"]["spec"])


def test_nightly_lifecycle_schedule_and_a_watcher_every_minute():
    assert DEPLOYMENTS["nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert DEPLOYMENTS["watch-landing"]["schedules"] == [{"interval": 60, "active": True}]
    assert DEPLOYMENTS["watch-landing"]["concurrency_limit"]["collision_strategy"] == "CANCEL_NEW"


def triggers():
    return {(name, t["expect"][0]): t for name, dep in DEPLOYMENTS.items() for t in dep.get("triggers", [])}


def test_triggers_chain_the_stages_on_the_events_the_code_emits():
    found = triggers()
    assert set(found) == {("landed", LANDED_EVENT), ("build", ValidationReport.event), ("deploy", PROMOTED_EVENT)}
    validated = found[("build", ValidationReport.event)]["match"]["prefect.resource.id"]
    assert validated == f"lifecycle.{ValidationReport.kind}.*"
    assert found[("deploy", PROMOTED_EVENT)]["match"]["prefect.resource.id"] == "lifecycle.model_version.*"
    for key in (("build", ValidationReport.event), ("deploy", PROMOTED_EVENT)):
        assert found[key]["match_related"] == {"prefect.resource.id": f"prefect.tag.{CHAIN_TAG}"}
    assert "match_related" not in found[("landed", LANDED_EVENT)]  # the watcher and `notify` are outside the chain


def test_trigger_parameters_are_parameters_of_their_flow():
    for (name, _), trigger in triggers().items():
        params = inspect.signature(load_flow(DEPLOYMENTS[name]["entrypoint"]).fn).parameters
        for key, template in trigger["parameters"].items():
            assert key in params and "{{ event." in template


def test_gpu_pools_request_gpus_and_accept_the_job_variables():
    docker = json.loads(POOLS["lifecycle-docker-gpu"][1].read_text())
    k8s = json.loads(POOLS["lifecycle-k8s-gpu"][1].read_text())
    assert docker["job_configuration"]["container_create_kwargs"] == "{{ container_create_kwargs }}"
    [request] = docker["variables"]["properties"]["container_create_kwargs"]["default"]["device_requests"]
    assert request["capabilities"] == [["gpu"]] and request["count"] == -1
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    for name, template in (("gpu-docker", docker), ("gpu-k8s", k8s)):
        job_vars = DEPLOYMENTS[name]["work_pool"]["job_variables"]
        assert set(job_vars) <= set(template["variables"]["properties"]), name
        step = DEPLOYMENTS[name]["pull"][0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == "/opt/lifecycle"
