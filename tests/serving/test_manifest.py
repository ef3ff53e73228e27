"""The served-files manifest: what the deployment id hashes, the image holds and the MLflow model packs.

The acceptance checks list real artifacts: the build context tar that tasks/docker_images.py sends
to the daemon (no dockerd needed) and the files of a saved MLflow model; neither may carry CLI,
flow, stage (tasks/) or Great Expectations code.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from infra_blocks import ServingTarget
from lifecycle.records import ModelVersion
from serving.manifest import DOCKERFILE, PROJECT_ROOT, ManifestError, served_files
from tasks import docker_images as di
from tasks.serving import deployment_id
from tests.serving.test_app import write_model_dir

FORBIDDEN = ("cli/", "flows/", "tasks/", "infra_blocks/", "deployments/", "great_expectations")
MODEL = ModelVersion(id="mv1", dataset="tickets", model_name="tickets", version="1", run_id="r1", trained_model="tm1",
                     aliases=["challenger"], promoted=True, decision="first model", metric="accuracy",
                     challenger_value=0.9)
SERVED = served_files()


def carries_nothing_else(names: list[str]) -> list[str]:
    return [n for n in names if any(part in n for part in FORBIDDEN)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model"), rows=200)


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the served packages and the Dockerfile, to change one file at a time."""
    for package in ("serving", "lifecycle"):
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_manifest_is_serving_and_the_core_it_imports():
    assert all(f.startswith(("serving/", "lifecycle/")) and f.endswith(".py") for f in SERVED)
    assert {"serving/__main__.py", "serving/app.py", "serving/model.py", "serving/pyfunc.py",
            "lifecycle/features.py", "lifecycle/encoder.py", "lifecycle/search.py", "lifecycle/spec.py",
            "lifecycle/errors.py", "lifecycle/__init__.py", "serving/__init__.py"} <= set(SERVED)
    assert "lifecycle/sample.py" not in SERVED and "lifecycle/streaming.py" not in SERVED  # not imported by serving


def test_manifest_holds_every_project_module_a_server_really_imports():
    """The ast walk against the interpreter: import every served entry point, list what got loaded."""
    code = ("import json, sys; import serving.__main__, serving.app, serving.batching, serving.model, "
            "serving.pyfunc, lifecycle.search, lifecycle.encoder; "
            "print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values()) "
            "if getattr(m, '__file__', None))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    loaded = {str(Path(f).resolve().relative_to(PROJECT_ROOT)) for f in json.loads(out.stdout.splitlines()[-1])
              if Path(f).resolve().is_relative_to(PROJECT_ROOT) and ".venv" not in Path(f).parts}
    assert loaded and loaded <= set(SERVED), loaded - set(SERVED)


@pytest.mark.parametrize("rel", SERVED)
def test_a_change_to_any_served_file_is_a_new_deployment(tree, rel):
    target = ServingTarget(port=8765)
    before = deployment_id(MODEL, None, target, root=tree)
    assert deployment_id(MODEL, None, target, root=tree) == before  # deterministic
    with open(tree / rel, "a") as fh:
        fh.write("\n# changed\n")
    assert deployment_id(MODEL, None, target, root=tree) != before


def test_a_changed_dockerfile_is_a_new_docker_deployment(tree):
    target = ServingTarget(kind="docker", port=8765)
    before = deployment_id(MODEL, None, target, root=tree)
    with open(tree / DOCKERFILE, "a") as fh:
        fh.write("\nLABEL changed=yes\n")
    assert deployment_id(MODEL, None, target, root=tree) != before


def test_a_new_module_imported_by_the_server_joins_the_manifest(tree):
    (tree / "lifecycle" / "extra_core.py").write_text("X = 1\n")
    with open(tree / "serving" / "model.py", "a") as fh:
        fh.write("\nfrom lifecycle import extra_core  # noqa: E402,F401\n")
    assert "lifecycle/extra_core.py" in served_files(tree)


def test_served_code_may_not_import_the_stages(tree):
    with open(tree / "serving" / "config.py", "a") as fh:
        fh.write("\nfrom tasks.serving import deployment_id  # noqa: E402,F401\n")
    with pytest.raises(ManifestError, match=r"serving/config.py imports tasks.serving"):
        served_files(tree)


def test_image_build_context_carries_serving_and_core_only(model_dir):
    entries = [name for name, *_ in di.app_entries(model_dir)]
    data, _ = di.app_context(model_dir)
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers() if m.isfile()]
    assert sorted(names) == sorted(entries)
    code = sorted(n.removeprefix("code/") for n in names if n.startswith("code/"))
    assert code == SERVED
    assert set(names) - {f"code/{f}" for f in SERVED} == {"Dockerfile", "model/booster.json",
                                                          "model/feature_schema.json"}
    assert not carries_nothing_else(names)


def test_mlflow_model_carries_serving_and_core_only(model_dir, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from lifecycle.sample import generate_tickets
    from serving.pyfunc import BoosterPredictor, LifecycleModel, code_paths, pip_requirements

    dest = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(dest), python_model=LifecycleModel(), code_paths=code_paths(tmp_path / "pack"),
                             artifacts={"booster": str(model_dir / "booster.json"),
                                        "feature_schema": str(model_dir / "feature_schema.json")},
                             pip_requirements=pip_requirements(False))
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    code = sorted(f.removeprefix("code/") for f in files if f.startswith("code/"))
    assert code == SERVED
    assert not carries_nothing_else(files)
    frame = generate_tickets(5, seed=4)
    loaded = mlflow.pyfunc.load_model(str(dest))
    expected = BoosterPredictor.from_files(model_dir / "booster.json", model_dir / "feature_schema.json").predict(frame)
    pd.testing.assert_frame_equal(loaded.predict(frame).reset_index(drop=True), expected.reset_index(drop=True))
