"""Serving images built offline through the docker SDK: wheelhouse, dependency image, deployment image.

Why three steps:
- The **wheelhouse** is built on the host, once (tasks/serving_wheels.py): exactly the serving
  requirements, pinned to requirements.lock, as wheels in a cache folder reused by every later build.
  Nothing in an image build reaches an index (no TLS interception problems, no PEP 668).
- The **dependency image** `lifecycle-serving-deps:<hash>` is the base image plus `/opt/venv` installed
  from the wheelhouse with `--no-index` (uv when the host has it, else pip), the `serving` user and
  `/app/run`. It is made with create → put_archive → start → commit rather than a Dockerfile: the
  wheels are deleted before the commit, so the image holds one venv layer and no wheel layer, and no
  second stage has to copy 1-2 GB (measured here: a multi-stage build spent 3 of its 5 minutes
  committing and copying layers). Its tag hashes the base image id and the requirement pins, so it
  is built once per requirement set. Two sets exist: `core` (no torch: a tabular model without index)
  and `search` (+ LanceDB and the sentence encoder).
- The **deployment image** `lifecycle-serving:<deployment id>` is `serving/Dockerfile`: the deps image
  plus the served code (`serving.manifest.served_files`, the same list the deployment id hashes) and
  the model's two files, labelled with the lineage. Seconds to build.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from infra_blocks import ServingTarget
from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema
from lifecycle.records import stable_hash
from serving.config import ServingConfig
from serving.manifest import DOCKERFILE, served_files
from serving.model import MODEL_FILES as SERVED_MODEL_FILES
from serving.model import SCHEMA_FILE, missing_files
from tasks.serving_common import CONFIG_FILE, ServingImage, TarEntry, tar
from tasks.serving_wheels import (
    build_wheelhouse,
    file_lock,
    locked_versions,
    requirements_closure,
    serving_requirements,
    wheelhouse_dir,
)

# The wheelhouse functions stay importable from here: image builds and their tests reach them as one module.
__all__ = ["app_context", "app_entries", "build_app_image", "build_image", "build_wheelhouse", "deps_image",
           "docker_client", "image_summary", "locked_versions", "requirements_closure",
           "serving_requirements"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVING_UID = 10001
CONTAINER_PORT = 8080
DEPS_REPO = "lifecycle-serving-deps"
APP_REPO = "lifecycle-serving"
LABEL = "org.lifecycle"
MODEL_FILES = (SCHEMA_FILE, *SERVED_MODEL_FILES.values())  # the schema and the model file of its family
# Trimmed from the venv before the commit: never imported by a server (tests, C headers).
TRIM = ("find /opt/venv -depth -type d -name tests -prune -exec rm -rf {} +; "
        "rm -rf /opt/venv/lib/python3*/site-packages/torch/include /opt/venv/lib/python3*/site-packages/torch/test")


def docker_client(base_url: str | None, timeout: int = 600) -> Any:
    """A docker SDK client for `base_url` (None: DOCKER_HOST or the local socket), checked with a ping.

    Raises:
        LifecycleError: the SDK is missing or the daemon does not answer.
    """
    try:
        import docker
    except ImportError as exc:
        raise LifecycleError("docker serving target: the `docker` package is not installed") from exc
    try:
        client = (docker.DockerClient(base_url=base_url, timeout=timeout) if base_url
                  else docker.from_env(timeout=timeout))
        client.ping()
    except docker.errors.DockerException as exc:
        where = base_url or os.environ.get("DOCKER_HOST") or "the local docker socket"
        raise LifecycleError(f"docker serving target: no docker daemon answers at {where} ({exc})") from exc
    return client


# --- images --------------------------------------------------------------------------------------------


def image_exists(client: Any, ref: str) -> Any | None:
    import docker

    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None


def base_image(client: Any, ref: str) -> Any:
    """The configured base image; a missing one is a setup problem with a one-line fix."""
    image = image_exists(client, ref)
    if image is None:
        raise LifecycleError(f"base image {ref} not found on the docker host; build it with scripts/docker_setup.sh "
                             f"(LIFECYCLE_BASE_IMAGE={ref})")
    return image


def _installer() -> Path | None:
    """uv (10x faster offline installs) from this venv or PATH; None: pip in the image is used."""
    near = Path(sys.executable).parent / "uv"
    which = shutil.which("uv")
    return near if near.exists() else (Path(which) if which else None)


def install_script(use_uv: bool) -> str:
    """The shell run once in a container of the base image to make the deps image."""
    # uv unpacks into its cache and hard-links into the venv (one write of ~1.6 GB, not two); the
    # cache is deleted before the commit, so only the venv's links remain in the layer.
    install = ("python3 -m venv --without-pip /opt/venv && UV_CACHE_DIR=/tmp/uv-cache /wheels/uv pip install --quiet "
               "--offline --no-index --find-links /wheels --python /opt/venv/bin/python --compile-bytecode "
               "--link-mode hardlink -r /wheels/requirements.txt && rm -rf /tmp/uv-cache" if use_uv else
               "python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --no-cache-dir --no-index "
               "--find-links /wheels -r /wheels/requirements.txt && /opt/venv/bin/pip uninstall -y -q pip")
    return "\n".join([
        "set -eu",
        install,
        TRIM,
        f"useradd --system --uid {SERVING_UID} --user-group --no-create-home --home-dir /app "
        "--shell /usr/sbin/nologin serving",
        f"mkdir -p /app/run && chown {SERVING_UID}:{SERVING_UID} /app/run && chmod 700 /app/run",
        "rm -rf /wheels /root/.cache",
    ])


def deps_spec(client: Any, base: str, with_search: bool,
              roots: Iterable[str] | None = None, kind: str | None = None) -> tuple[str, list[str], str, list[str]]:
    """(tag, requirement pins, install script, commit changes) of the dependency image for a base.

    `roots`/`kind` name another requirement set (the benchmark's `pip install mlflow` image).
    """
    base_id = base_image(client, base).id
    requirements = requirements_closure(roots) if roots is not None else serving_requirements(with_search)
    script = install_script(_installer() is not None)
    changes = ["ENV PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin", 'CMD ["python"]',
               f'LABEL {LABEL}.role="deps" {LABEL}.requirements="{len(requirements)} pins" {LABEL}.base="{base_id}"']
    kind = kind or ("search" if with_search else "core")
    tag = f"{DEPS_REPO}:{kind}-{stable_hash(base_id, requirements, script, changes, length=12)}"
    return tag, requirements, script, changes


def deps_image(client: Any, base: str, with_search: bool, wheelhouse: Path | None = None,
               log: Any = print, roots: Iterable[str] | None = None, kind: str | None = None) -> str:
    """The tag of the dependency image for (base image, requirement set), building it if missing.

    Raises:
        LifecycleError: the base image is missing, a wheel cannot be had, or the offline install failed
            (with the tail of the install log).
    """
    tag, requirements, script, changes = deps_spec(client, base, with_search, roots, kind)
    uv = _installer()
    if image_exists(client, tag) is not None:
        return tag
    wheels = build_wheelhouse(requirements, wheelhouse)
    with file_lock((wheelhouse or wheelhouse_dir()) / f".build-{tag.split(':')[1]}.lock"):
        if image_exists(client, tag) is not None:  # built by someone else while we waited
            return tag
        t0 = time.perf_counter()
        entries: list[TarEntry] = [
            (f"wheels/{w.name}", w, 0o644, 0) for w in wheels.values()]
        entries.append(("wheels/requirements.txt", "\n".join(requirements).encode() + b"\n", 0o644, 0))
        if uv is not None:
            entries.append(("wheels/uv", uv, 0o755, 0))
        container = client.containers.create(base, ["sh", "-c", script], user="0:0", network_disabled=True,
                                             labels={f"{LABEL}.role": "deps-build"})
        try:
            with tempfile.TemporaryFile() as fh:  # the wheels (0.5 GB with torch) streamed, not held in memory
                tar(entries, fh)
                fh.seek(0)
                container.put_archive("/", fh)
            container.start()
            status = container.wait()["StatusCode"]
            if status != 0:
                tail = container.logs(tail=15).decode(errors="replace").strip()
                raise LifecycleError(f"dependency image {tag}: offline install failed (exit {status}): {tail}")
            container.commit(repository=tag.split(":")[0], tag=tag.split(":")[1],
                             message=f"offline install of {len(requirements)} wheels",
                             changes=changes)
        finally:
            container.remove(force=True)
        log(f"built {tag} ({len(requirements)} packages) in {time.perf_counter() - t0:.0f} s")
    return tag


def app_entries(model_dir: Path, root: Path = PROJECT_ROOT) -> list[TarEntry]:
    """What a deployment image's build context holds: the Dockerfile, the served code, the model files.

    Raises:
        LifecycleError: a model file is missing from the snapshot.
    """
    entries: list[TarEntry] = [("Dockerfile", root / DOCKERFILE, 0o644, 0)]
    entries += [(f"code/{rel}", root / rel, 0o644, 0) for rel in served_files(root)]
    present = [name for name in MODEL_FILES if (model_dir / name).exists()]
    missing = missing_files(present)
    if missing:
        raise LifecycleError(f"{model_dir}: model file {', '.join(missing)} missing from the snapshot")
    entries += [(f"model/{name}", model_dir / name, 0o644, 0) for name in present]
    return entries


def app_context(model_dir: Path) -> tuple[bytes, str]:
    """The build context of a deployment image (`app_entries` as a tar) and its content hash."""
    data = tar(app_entries(model_dir))
    return data, hashlib.sha256(data).hexdigest()[:16]


def lineage_labels(lineage: dict[str, str | None]) -> dict[str, str]:
    """OCI + lifecycle labels: who built what from which records (`docker inspect` shows them)."""
    labels = {f"{LABEL}.lineage.{k}": str(v) for k, v in lineage.items() if v is not None}
    title = f"lifecycle serving: {lineage.get('model_name')} v{lineage.get('model_version')}"
    labels["org.opencontainers.image.title"] = title
    labels["org.opencontainers.image.source"] = "lifecycle serving/Dockerfile"
    return labels


def build_app_image(client: Any, deps: str, model_dir: Path, lineage: dict[str, str | None]) -> Any:
    """Build (or reuse, when the context is unchanged) `lifecycle-serving:<deployment id>`.

    Raises:
        LifecycleError: the build failed (with the failing step's output).
    """
    import docker

    context, digest = app_context(model_dir)
    tag = f"{APP_REPO}:{lineage.get('deployment_id') or digest}"
    labels = {**lineage_labels(lineage), f"{LABEL}.context": digest, f"{LABEL}.deps-image": deps}
    existing = image_exists(client, tag)
    if existing is not None and existing.labels.get(f"{LABEL}.context") == digest \
            and existing.labels.get(f"{LABEL}.deps-image") == deps:
        return existing
    try:
        image, _ = client.images.build(fileobj=io.BytesIO(context), custom_context=True, tag=tag, labels=labels,
                                       buildargs={"DEPS_IMAGE": deps}, rm=True, forcerm=True, pull=False)
    except docker.errors.BuildError as exc:
        lines = [str(c.get("stream") or c.get("error") or "").strip() for c in exc.build_log]
        tail = " | ".join(ln for ln in lines if ln)[-400:]
        raise LifecycleError(f"image {tag}: build failed: {exc.msg} ({tail})") from exc
    return image


def build_image(target: ServingTarget, snapshot: Path, log: Any = print) -> Any:
    """The deployment image for a snapshot folder (deps image first, built once per requirement set)."""
    client = docker_client(target.docker_base_url)
    config = ServingConfig.read(snapshot / CONFIG_FILE)
    schema = FeatureSchema.model_validate_json((snapshot / SCHEMA_FILE).read_bytes())
    with_search = config.index is not None or bool(schema.embedding_dim)
    deps = deps_image(client, target.base_image, with_search, log=log)
    return build_app_image(client, deps, snapshot, config.lineage)


def image_summary(image: Any) -> ServingImage:
    """Id (the image digest), tags, size in MB: what the deploy stage reports."""
    return ServingImage(id=image.id, tags=image.tags, size_mb=round(image.attrs.get("Size", 0) / 1e6, 1),
                        labels={k: v for k, v in (image.labels or {}).items() if k.startswith(LABEL)})
