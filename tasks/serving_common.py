"""What every serving backend shares: the backend protocol, the running-server record, smoke tests, lock, tar.

Why this module: the backends (tasks/process_serving.py, tasks/docker_serving.py) each import this
one and never each other, and the registry above them (tasks/serving.py) picks one by
`ServingTarget.kind`. So dependencies point one way: registry → backends → this module.

- `ServingBackend` is what the deploy flow and the CLI call: `prepare` (what a rollout needs besides
  the snapshot: nothing for a process, the image for docker), `rollout`, `serving_now`, `stop_current`.
- `RunningServer` is the one answer every backend gives about a live server. Fields that only one
  kind has are None for the other (`pid` for a process, `container` for docker), so no caller reads
  a made-up PID.
- Every rollout proves the new server before it takes traffic with `smoke_test_url`: one prediction
  on a row built from the schema, `/version` naming the new deployment, one search when an index is
  served.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, Field, SecretStr

from infra_blocks import ServingTarget
from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema
from lifecycle.records import utcnow
from lifecycle.spec import Task
from serving.config import ServingConfig
from serving.model import SCHEMA_FILE, sample_row

CONFIG_FILE = "config.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TarEntry = tuple[str, Path | bytes, int, int]  # (archive name, file or bytes, mode, uid)


class RunningServer(BaseModel):
    """A live server of a target, whichever backend runs it (process: `pid`; docker: `container`)."""

    kind: str = Field("process", description="Backend kind (ServingTarget.kind) that runs the server.")
    deployment_id: str
    host: str = Field(..., description="Published address: what clients connect to.")
    port: int
    pid: int | None = Field(None, description="Process group leader (process kind).")
    create_time: float | None = Field(None, description="Its start time (psutil), to tell a reused PID apart.")
    snapshot: str | None = Field(None, description="Snapshot folder the server runs from (process kind).")
    container: str | None = Field(None, description="Container id (docker kind).")
    container_name: str | None = None
    image_id: str | None = Field(None, description="Image digest the container runs (docker kind).")
    address: str | None = Field(None, description="<name>:<port> on the serving network, where the edge routes.")
    test_url: str | None = Field(None, description="The backend alone, bypassing the edge (smoke tests).")
    lineage: dict[str, str | None] = Field(default_factory=dict)
    started_at: datetime = Field(default_factory=utcnow)

    @property
    def endpoint(self) -> str:
        return base_url(self.host, self.port)

    @property
    def handle(self) -> str:
        """What the Deployment record stores: the PID, or the short container id."""
        if self.container:
            return self.container[:12]
        return str(self.pid) if self.pid is not None else ""

    @property
    def summary(self) -> str:
        """`PID 1234` or `container 0123456789ab`, for messages."""
        return f"container {self.container[:12]}" if self.container else f"PID {self.pid}"


class ServingImage(BaseModel):
    """A built image a docker rollout runs: what the Deployment record reports of it."""

    id: str = Field(..., description="Image digest (sha256:…).")
    tags: list[str] = Field(default_factory=list)
    size_mb: float = 0.0
    labels: dict[str, str] = Field(default_factory=dict)


class ServingBackend(Protocol):
    """How the deploy flow and the CLI drive one kind of serving target."""

    kind: str

    def prepare(self, target: ServingTarget, snapshot: Path) -> ServingImage | None:
        """Build what a rollout runs besides the snapshot folder (an image), or None."""
        ...

    def rollout(self, target: ServingTarget, snapshot: Path, image: ServingImage | None,
                grace_s: float = 10.0) -> tuple[RunningServer, str | None]:
        """Make the snapshot the target's live server; returns (it, previous deployment id or None)."""
        ...

    def serving_now(self, target: ServingTarget, deployment: str) -> RunningServer | None:
        """The live server if it serves `deployment` and answers (token checked), else None."""
        ...

    def stop_current(self, target: ServingTarget, grace_s: float = 10.0) -> RunningServer | None:
        """Stop whatever the target serves; returns what was serving."""
        ...


def base_url(host: str, port: int) -> str:
    """URL a client on this machine uses; a wildcard bind is reached over loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def auth_headers(token: SecretStr | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}


def http_client(config: ServingConfig, timeout: float = 5.0) -> httpx.Client:
    """A client for the server a config describes (its address, its token)."""
    return httpx.Client(base_url=base_url(config.host, config.port), headers=auth_headers(config.api_token),
                        timeout=timeout)


def smoke_test_url(url: str, token: SecretStr | None, schema: FeatureSchema, deployment: str | None,
                   with_index: bool) -> dict[str, object]:
    """One prediction on a row built from the schema, `/version` naming `deployment`, one search if indexed.

    Raises:
        LifecycleError: naming the endpoint that answered wrong and what it answered.
    """
    with httpx.Client(base_url=url, headers=auth_headers(token), timeout=30.0) as client:
        resp = client.post("/invocations", json={"dataframe_records": [sample_row(schema)]})
        if resp.status_code != 200:
            raise LifecycleError(f"smoke test: /invocations answered {resp.status_code}: {resp.text[:200]}")
        predictions = resp.json().get("predictions")
        if not isinstance(predictions, list) or len(predictions) != 1:
            raise LifecycleError(f"smoke test: expected one prediction, got {str(predictions)[:200]}")
        label = predictions[0].get("prediction") if isinstance(predictions[0], dict) else None
        if schema.task is Task.regression:
            if isinstance(label, bool) or not isinstance(label, (int, float)):
                raise LifecycleError(f"smoke test: prediction {str(predictions[0])[:200]} is not a number")
        elif label not in schema.classes:
            raise LifecycleError(f"smoke test: prediction {str(predictions[0])[:200]} "
                                 "is not one of the model's classes")
        served = client.get("/version").json().get("deployment_id")
        if served != deployment:
            raise LifecycleError(f"smoke test: {url} serves deployment {served}, not {deployment}")
        result: dict[str, object] = {"prediction": label}
        if with_index:
            resp = client.post("/search", json={"query": "smoke test", "k": 1})
            if resp.status_code != 200 or not isinstance(resp.json().get("results"), list):
                raise LifecycleError(f"smoke test: /search answered {resp.status_code}: {resp.text[:200]}")
            result["search_results"] = len(resp.json()["results"])
    return result


def smoke_test(config: ServingConfig) -> dict[str, object]:
    """`smoke_test_url` for the server a snapshot config describes."""
    schema = FeatureSchema.model_validate_json(Path(config.model_dir, SCHEMA_FILE).read_bytes())
    return smoke_test_url(base_url(config.host, config.port), config.api_token, schema, config.deployment_id,
                          config.index is not None)


@contextmanager
def target_lock(target: ServingTarget) -> Iterator[None]:
    """One rollout per target at a time: event triggers are at-least-once, so two deploys can overlap."""
    import fcntl

    path = Path(target.workdir).resolve() / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def tar(entries: Iterable[TarEntry], dest: Any = None) -> bytes:
    """A reproducible tar of (archive name, file or bytes, mode, uid) entries; parent folders added as needed.

    Times are zero and owners numeric, so the same files give the same bytes (and the same image).
    Written to `dest` (an open binary file, for big contexts) when given; else returned as bytes.
    """
    buf = dest if dest is not None else io.BytesIO()
    dirs: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for name, src, mode, uid in entries:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folder = "/".join(parts[:i])
                if folder not in dirs:
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, 0o755, 0, 0, 0
                    archive.addfile(info)
                    dirs.add(folder)
            if isinstance(src, Path):
                info = archive.gettarinfo(str(src), arcname=name)
                info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime = mode, uid, uid, "", "", 0
                with open(src, "rb") as fh:
                    archive.addfile(info, fh)
            else:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.uid, info.gid, info.mtime = len(src), mode, uid, uid, 0
                archive.addfile(info, io.BytesIO(src))
    return b"" if dest is not None else buf.getvalue()
