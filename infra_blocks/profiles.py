"""Profiles: one YAML file per environment that yields the five block documents.

`deployments/profiles/local.yaml` is the embedded default (file lake, SQLite MLflow, local Dask,
LanceDB folder, process serving); `prod.yaml` points the same blocks at S3, a dask-cuda cluster, an
MLflow server and a Docker host. Values may use `${VAR}` and `${VAR:-default}`; `${LIFECYCLE_HOME}`
defaults to `.lifecycle` under the current directory. Secrets come from the environment, never the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, ValidationError

from infra_blocks import DaskCompute, MlflowTarget, ObjectStore, ServingTarget, VectorStore
from lifecycle.errors import LifecycleError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "deployments" / "profiles"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Targets(BaseModel):
    """The five blocks a lifecycle run needs, as one typed bundle."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    store: ObjectStore
    compute: DaskCompute
    mlflow: MlflowTarget
    vectors: VectorStore
    serving: ServingTarget

    def block_names(self, profile: str) -> dict[str, str]:
        return {field: f"{profile}-{field}" for field in type(self).model_fields}


def lifecycle_home() -> Path:
    return Path(os.environ.get("LIFECYCLE_HOME") or Path.cwd() / ".lifecycle").resolve()


def _expand(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise LifecycleError(f"profile: environment variable {name} is not set")

    return _VAR.sub(sub, value)


def profile_path(profile: str) -> Path:
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    path = PROFILE_DIR / f"{profile}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise LifecycleError(f"profile {profile!r}: no such profile (known: {known})")
    return path


def load_profile(profile: str = "local") -> Targets:
    """Build the blocks of a profile (a name in deployments/profiles or a YAML path) without an API."""
    path = profile_path(profile)
    env = {**os.environ, "LIFECYCLE_HOME": str(lifecycle_home())}
    raw = _expand(yaml.safe_load(path.read_text()) or {}, env)
    try:
        return Targets(
            store=ObjectStore(**raw.get("store", {})),
            compute=DaskCompute(**raw.get("compute", {})),
            mlflow=MlflowTarget(**raw.get("mlflow", {})),
            vectors=VectorStore(**raw.get("vectors", {})),
            serving=ServingTarget(**raw.get("serving", {})),
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise LifecycleError(f"{path}: {exc.title} {where}: {err['msg']}") from exc


def apply_profile(profile: str = "local") -> dict[str, str]:
    """Save the profile's blocks as block documents named `<profile>-<role>` (overwriting)."""
    targets = load_profile(profile)
    name = Path(profile).stem
    names = targets.block_names(name)
    for field, block_name in names.items():
        getattr(targets, field).save(block_name, overwrite=True)
    return names


def load_targets(profile: str = "local") -> Targets:
    """Load the saved block documents of a profile from the Prefect API (deployments use this)."""
    names = Targets.model_fields
    types: dict[str, type[Block]] = {"store": ObjectStore, "compute": DaskCompute, "mlflow": MlflowTarget,
                                     "vectors": VectorStore, "serving": ServingTarget}
    try:
        return Targets(**{f: types[f].load(f"{profile}-{f}") for f in names})
    except ValueError as exc:
        raise LifecycleError(f"profile {profile!r}: blocks not found; "
                             f"run `lifecycle blocks apply --profile {profile}`") from exc
