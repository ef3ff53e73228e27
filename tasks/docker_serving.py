"""Docker serving: one container per deployment behind an edge that owns the published port.

Why this shape:
- **Blue/green without a gap.** A container's published port is fixed at creation, so "stop the old,
  start the new on the same port" leaves users without an endpoint for a whole model load. Instead
  the published port (127.0.0.1 unless the target says otherwise) belongs to a long-lived edge
  container: HAProxy from the base image (tasks/haproxy.py: timeouts, X-Forwarded-For, health
  checks). Backends live on the `lifecycle-serving` network and each also gets a random 127.0.0.1
  port for tests. A rollout starts the new backend beside the old, waits for `/health`, smoke-tests
  it on its own port (a prediction, `/version`, a search), switches the edge's spare server slot to it
  through HAProxy's runtime API, checks through the published endpoint that the new deployment
  answers, lets the old slot drain, and only then stops the old one (SIGTERM: uvicorn finishes what
  it has). HAProxy routes request by request, so keep-alive clients never see the switch.
- **Failure keeps the old one.** Any failure before the switch removes the new container and leaves
  route and old backend untouched; a failure after it switches back. The error carries the reason
  and the new container's log tail.
- **State lives on the docker host**: the edge's config file names the live backend; containers
  carry the lineage as labels. No local file can disagree with what runs.
- **Secrets stay out of images and `docker inspect`**: config.json (and the token) are put into
  `/app/run` (0400, uid 10001) between create and start. Backends run as uid 10001 with all
  capabilities dropped and no-new-privileges; a local LanceDB folder is mounted read-only.
- **One set of client bounds**: the edge's timeouts, 431 head limit and client cap are derived from the
  target's `limits`, which the server behind it enforces too (`edge_config`), as on the process target.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from infra_blocks import ServingTarget
from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema
from serving.config import ServingConfig
from serving.model import SCHEMA_FILE
from tasks import haproxy
from tasks.docker_images import (
    CONTAINER_PORT,
    LABEL,
    SERVING_UID,
    base_image,
    build_image,
    docker_client,
    image_summary,
)
from tasks.processes import wait_until_ok
from tasks.serving_common import (
    CONFIG_FILE,
    RunningServer,
    ServingImage,
    TarEntry,
    auth_headers,
    base_url,
    smoke_test_url,
    tar,
    target_lock,
)

NETWORK = "lifecycle-serving"
RUN_DIR = "/app/run"
LANCEDB_MOUNT = "/data/lancedb"
HARDENING = {"cap_drop": ["ALL"], "security_opt": ["no-new-privileges"]}


def edge_name(target: ServingTarget) -> str:
    return f"lifecycle-edge-{target.port}"


def _get(client: Any, name_or_id: str) -> Any | None:
    import docker

    try:
        return client.containers.get(name_or_id)
    except docker.errors.NotFound:
        return None


def ensure_network(client: Any) -> Any:
    found = client.networks.list(names=[NETWORK])
    exact = [n for n in found if n.name == NETWORK]
    return exact[0] if exact else client.networks.create(NETWORK, driver="bridge", labels={f"{LABEL}.role": "network"})


def log_tail(container: Any, lines: int = 20) -> str:
    try:
        text = container.logs(tail=lines).decode(errors="replace").strip()
    except Exception:  # noqa: BLE001 - the container may be gone already
        return "(no container log)"
    return text or "(container log is empty)"


def remove(container: Any | None, grace_s: float = 10.0) -> None:
    """Stop (SIGTERM, then SIGKILL after `grace_s`) and delete a container; gone already is fine."""
    import docker

    if container is None:
        return
    try:
        container.stop(timeout=int(grace_s))
    except docker.errors.NotFound:
        return
    except docker.errors.APIError:
        pass
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass


# --- the edge ----------------------------------------------------------------------------------------


def edge_config(target: ServingTarget) -> haproxy.EdgeConfig:
    """The edge's HAProxy settings, from the target's `limits`, so the edge bounds a client as the server does.

    Head time (and silence before a first request: HAProxy's `http-request` timeout covers it), body time,
    keep-alive and head size (431) are the server's; `timeout client`, an inactivity bound, is never
    shorter than a phase it must outlast. The client cap is the server's per-worker cap times the
    workers behind the edge (HAProxy pools its backend connections: it caps clients, the server caps
    connections), and `maxconn` stays twice it, so a client past the cap is accepted and answered 503.
    """
    limits, default = target.limits, haproxy.EdgeConfig()
    timeouts = default.timeouts.model_copy(update={
        "http_request_s": limits.header_timeout_s, "body_s": limits.body_timeout_s,
        "http_keep_alive_s": limits.keep_alive_s,
        "client_s": max(default.timeouts.client_s, limits.header_timeout_s, limits.body_timeout_s)})
    clients = limits.max_connections * target.workers
    return haproxy.EdgeConfig(max_body_bytes=target.max_body_bytes, max_header_bytes=limits.max_header_bytes,
                              timeouts=timeouts, max_clients=clients, maxconn=max(default.maxconn, 2 * clients))


def ensure_edge(client: Any, target: ServingTarget) -> Any:
    """The running edge of the target, (re)created when missing or made from other settings (image, limits, port).

    A changed edge is replaced and keeps its route: the new container starts from the old one's stored
    config, so the same backend is live after a brief interruption.

    Raises:
        LifecycleError: the base image is missing, or the published port cannot be bound.
    """
    base_image(client, target.base_image)
    ensure_network(client)
    name, config, publish = edge_name(target), edge_config(target), (target.host, target.port)
    edge, spec = _get(client, name), haproxy.spec_of(target.base_image, config, publish)
    if edge is not None and edge.labels.get(f"{haproxy.LABEL}.edge-spec") == spec:
        if edge.status != "running":
            edge.start()
            haproxy.wait_listening(edge, config)
        return edge
    route = haproxy.read_route(edge) if edge is not None else haproxy.Route()
    if edge is not None:
        edge.remove(force=True)
    return haproxy.create_edge(client, name, target.base_image, NETWORK, publish, config, route,
                               labels={f"{LABEL}.endpoint": target.endpoint})


# --- backends ------------------------------------------------------------------------------------


def container_config(config: ServingConfig, image_id: str, has_token: bool) -> ServingConfig:
    """The snapshot's config as the container sees it: its own paths and port, the token as a file."""
    index = config.index
    if index is not None and "://" not in index.uri:
        index = index.model_copy(update={"uri": LANCEDB_MOUNT})
    return config.model_copy(update={
        "model_dir": "/app/model", "host": "0.0.0.0", "port": CONTAINER_PORT, "api_token": None,
        "api_token_file": f"{RUN_DIR}/token" if has_token else None, "index": index,
        "lineage": {**config.lineage, "image_digest": image_id}})


def start_backend(client: Any, target: ServingTarget, image: Any, config: ServingConfig) -> Any:
    """Create the deployment's container (config and token put in before start) and start it."""
    from docker.types import Mount

    token = config.api_token
    inner = container_config(config, image.id, token is not None)
    files: list[TarEntry] = [
        (CONFIG_FILE, inner.model_dump_json(indent=2).encode(), 0o400, SERVING_UID)]
    if token is not None:
        files.append(("token", token.get_secret_value().encode(), 0o400, SERVING_UID))
    mounts = []
    if config.index is not None and "://" not in config.index.uri:
        local = Path(config.index.uri).resolve()
        if not target.docker_base_url or target.docker_base_url.startswith("unix://"):
            mounts.append(Mount(LANCEDB_MOUNT, str(local), type="bind", read_only=True))
        else:
            raise LifecycleError(f"index {local}: a local LanceDB folder cannot be mounted into a remote docker "
                                 f"host ({target.docker_base_url}); use an s3:// vector store")
    deployment = str(config.deployment_id)
    labels = {f"{LABEL}.role": "backend", f"{LABEL}.endpoint": target.endpoint,
              f"{LABEL}.deployment-id": deployment, f"{LABEL}.image-digest": image.id}
    container = client.containers.create(
        image.id, name=f"lifecycle-{target.port}-{deployment[:12]}-{secrets.token_hex(2)}", network=NETWORK,
        ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1", None)}, labels=labels, mounts=mounts,
        tmpfs={"/tmp": "size=256m"}, **HARDENING)
    container.put_archive(RUN_DIR, tar(files))
    container.start()
    container.reload()
    return container


def backend_address(container: Any) -> tuple[str, str]:
    """(<name>:8080 on the network, http://127.0.0.1:<test port>) of a started backend.

    The edge reaches backends by container name (docker's DNS on the network), not IP: addresses
    change when the daemon restarts the containers, names do not.
    """
    settings = container.attrs["NetworkSettings"]
    bindings = (settings.get("Ports") or {}).get(f"{CONTAINER_PORT}/tcp") or []
    if NETWORK not in (settings.get("Networks") or {}) or not bindings:
        raise LifecycleError(f"container {container.name}: no address yet (status {container.status})")
    return f"{container.name}:{CONTAINER_PORT}", f"http://127.0.0.1:{bindings[0]['HostPort']}"


def backend_ip(container: Any) -> str:
    """The backend's address on the network now (the runtime switch needs it; the config keeps the name)."""
    ip = ((container.attrs["NetworkSettings"].get("Networks") or {}).get(NETWORK) or {}).get("IPAddress")
    if not ip:
        raise LifecycleError(f"container {container.name}: no address on {NETWORK} (status {container.status})")
    return str(ip)


def wait_backend(container: Any, url: str, timeout_s: float) -> None:
    """Poll `/health` until 200; fail early when the container exits."""

    def exited() -> str | None:
        container.reload()
        if container.status not in ("exited", "dead"):
            return None
        return f"container exited (status {container.attrs['State'].get('ExitCode')}) before becoming healthy"

    with httpx.Client(base_url=url, timeout=2.0) as http:
        wait_until_ok(lambda: http.get("/health"), exited, timeout_s,
                      f"container not healthy after {timeout_s:.0f} s", interval_s=0.2)


def _server(container: Any, target: ServingTarget) -> RunningServer:
    address, test_url = backend_address(container)
    labels = container.labels
    prefix = f"{LABEL}.lineage."
    lineage = {k.removeprefix(prefix): v for k, v in (container.image.labels or {}).items() if k.startswith(prefix)}
    return RunningServer(kind="docker", deployment_id=labels[f"{LABEL}.deployment-id"], host=target.host,
                         port=target.port, container=container.id, container_name=container.name,
                         image_id=container.image.id, address=address, test_url=test_url, lineage=lineage)


def current(client: Any, target: ServingTarget) -> tuple[Any | None, Any | None]:
    """(edge, live backend container) of the target; either may be None."""
    edge = _get(client, edge_name(target))
    if edge is None:
        return None, None
    live = haproxy.read_route(edge).live_upstream()
    backend = _get(client, live.container) if live is not None and live.container else None
    if backend is not None and backend.status != "running":
        backend = None
    return edge, backend


def serving_now(target: ServingTarget, deployment: str) -> RunningServer | None:
    """The live backend if it serves `deployment` through the published endpoint (token checked)."""
    try:
        client = docker_client(target.docker_base_url, timeout=10)
        edge, backend = current(client, target)
    except LifecycleError:
        return None
    if edge is None or backend is None or backend.labels.get(f"{LABEL}.deployment-id") != deployment:
        return None
    try:
        version = httpx.get(f"{base_url(target.host, target.port)}/version", headers=auth_headers(target.api_token),
                            timeout=3.0)
        ok = version.status_code == 200 and version.json().get("deployment_id") == deployment
    except (httpx.HTTPError, ValueError):
        return None
    return _server(backend, target) if ok else None


def stop_current(target: ServingTarget, grace_s: float = 10.0) -> RunningServer | None:
    """Stop the live backend, the edge and any leftover backend of this endpoint; returns the live one."""
    client = docker_client(target.docker_base_url)
    edge, backend = current(client, target)
    live = _server(backend, target) if backend is not None else None
    leftovers = client.containers.list(all=True, filters={"label": [f"{LABEL}.role=backend",
                                                                     f"{LABEL}.endpoint={target.endpoint}"]})
    for container in leftovers:
        remove(container, grace_s)
    remove(edge, grace_s=2)
    return live


# --- rollout ------------------------------------------------------------------------------------------


def rollout(target: ServingTarget, snapshot: Path, image: Any,
            grace_s: float = 10.0) -> tuple[RunningServer, str | None]:
    """Make `image` (built from `snapshot`) the live backend of the target; returns (new, previous id).

    Keeps the live backend when it already serves this deployment.

    Raises:
        LifecycleError: the new container did not start, become healthy, pass the smoke test or take
            over the endpoint; the old one (if any) still serves and the message says so.
    """
    with target_lock(target):
        return _rollout(target, snapshot, image, grace_s)


def _rollout(target: ServingTarget, snapshot: Path, image: Any, grace_s: float) -> tuple[RunningServer, str | None]:
    client = docker_client(target.docker_base_url)
    config = ServingConfig.read(snapshot / CONFIG_FILE)
    deployment = str(config.deployment_id)
    kept = serving_now(target, deployment)
    if kept is not None:
        return kept, None
    edge = ensure_edge(client, target)
    _, old = current(client, target)
    old_id = old.labels.get(f"{LABEL}.deployment-id") if old is not None else None
    keeps = f"deployment {old_id} keeps serving" if old is not None else "nothing was serving before"
    schema = FeatureSchema.model_validate_json((snapshot / SCHEMA_FILE).read_bytes())
    new = None
    try:
        new = start_backend(client, target, image, config)
        address, test_url = backend_address(new)
        wait_backend(new, test_url, target.health_timeout_s)
        smoke_test_url(test_url, target.api_token, schema, deployment, config.index is not None)
        route = haproxy.switch_edge(edge, edge_config(target), haproxy.Upstream(
            address=address, container=new.id, deployment_id=deployment), backend_ip(new))
        _confirm_switch(target, deployment)
    except BaseException as exc:  # whatever happens, the new one goes and the old one keeps the route
        tail = log_tail(new).replace("\n", "\n    ") if new is not None else "(not created)"
        live = haproxy.read_route(edge).live_upstream()
        if new is not None and old is not None and live is not None and live.container == new.id:
            haproxy.switch_edge(edge, edge_config(target), haproxy.Upstream(
                address=backend_address(old)[0], container=old.id, deployment_id=old_id), backend_ip(old))
        remove(new, grace_s=2)
        if not isinstance(exc, (LifecycleError, httpx.HTTPError, ValueError)) and not _is_docker_error(exc):
            raise
        raise LifecycleError(f"deployment {deployment}: {exc}; {keeps}\n  container log:\n    {tail}") from exc
    new.update(restart_policy={"Name": "unless-stopped"})  # live now: survive a daemon restart
    if old is not None:  # in-flight requests on the old slot are answered before it stops
        haproxy.wait_drained(haproxy.container_api(edge), route.spare(), timeout_s=grace_s)
    remove(old, grace_s)
    return _server(new, target), old_id


def _confirm_switch(target: ServingTarget, deployment: str, timeout_s: float = 10.0) -> None:
    """The published endpoint answers `/version` with the new deployment (the edge took the route)."""
    headers = auth_headers(target.api_token)
    deadline = time.monotonic() + timeout_s
    served = None
    while time.monotonic() < deadline:
        try:
            served = httpx.get(f"{base_url(target.host, target.port)}/version", headers=headers, timeout=2.0
                               ).json().get("deployment_id")
        except (httpx.HTTPError, ValueError):
            served = None
        if served == deployment:
            return
        time.sleep(0.05)
    raise LifecycleError(f"the published endpoint {target.endpoint} still serves {served} after the switch")


def _is_docker_error(exc: BaseException) -> bool:
    import docker

    return isinstance(exc, docker.errors.DockerException)


class DockerBackend:
    """`ServingBackend` for `kind: docker`: an image per deployment, a container per rollout, an edge."""

    kind = "docker"

    def prepare(self, target: ServingTarget, snapshot: Path) -> ServingImage | None:
        """The deployment image (built, or reused when its context is unchanged)."""
        return image_summary(build_image(target, snapshot))

    def rollout(self, target: ServingTarget, snapshot: Path, image: ServingImage | None,
                grace_s: float = 10.0) -> tuple[RunningServer, str | None]:
        """Raises:
            LifecycleError: no image was prepared, or the rollout failed (the old backend still serves).
        """
        if image is None:
            raise LifecycleError(f"docker serving target {target.endpoint}: no image prepared for {snapshot.name}")
        client = docker_client(target.docker_base_url)
        return rollout(target, snapshot, client.images.get(image.id), grace_s)

    def serving_now(self, target: ServingTarget, deployment: str) -> RunningServer | None:
        return serving_now(target, deployment)

    def stop_current(self, target: ServingTarget, grace_s: float = 10.0) -> RunningServer | None:
        return stop_current(target, grace_s)
