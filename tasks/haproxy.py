"""The edge of a docker target: HAProxy owns the published port and routes to the live backend.

Why this shape:
- **A kept proxy, not our own.** HAProxy (Debian bookworm's 2.6, in the base image through
  scripts/docker_setup.sh): timeouts on every phase (a client that stalls in its request head or body
  gets 408 after `http_request_s` / `body_s`), X-Forwarded-For/-Proto, health checks (`GET /health`), a
  retry when a pooled connection was closed by the backend, a soft stop that lets in-flight requests finish.
- **Two server slots, switched through the runtime API.** The backend `serving` has the slots `a` and
  `b`; one is live, the other in maintenance. A rollout points the spare slot at the new backend
  (`set server … addr` and, on docker, `fqdn`), marks it up and ready, then puts the old slot into
  maintenance. No reload, no new process: established client connections stay open and each next
  request goes to the new backend (HAProxy balances per request), so clients never see the switch.
- **The config file is the state.** After each switch the config is rendered again with the new
  route (slots by container name, plus a `# lifecycle-route` JSON line naming containers and
  deployments) and written into the edge container: a restarted edge comes back with the same route,
  and `read_route` answers "what is live" from the docker host alone. Names go through docker's DNS
  (`resolvers docker`), so a backend that starts after the edge, or gets a new address, is found.
- **The admin socket never leaves the container**: a unix socket on a tmpfs, reached with `docker
  exec` (works against a remote docker host too), not a published admin port.
- **A connection cap with a clear answer**: a connection beyond `max_clients` gets 503 JSON.
- **A head limit with the server's 431**: with `max_header_bytes` the buffer holds twice it and a larger
  head gets 431 JSON. A head that overflows the buffer (a 16 MB one) still gets 400: 2.6's H1 mux answers
  it before any rule runs, with a built-in message that `errorfile 400` does not replace (tried).
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from lifecycle.errors import LifecycleError
from lifecycle.records import stable_hash

BACKEND = "serving"
SLOTS: tuple[Literal["a"], Literal["b"]] = ("a", "b")
EDGE_PORT = 8080  # inside the edge container, published on the target's host:port
EDGE_UID = 10001
CONFIG_DIR = "/etc/haproxy"
CONFIG_NAME = "lifecycle.cfg"
SOCKET_DIR = "/run/haproxy"
DOCKER_DNS = "127.0.0.11:53"
ROUTE_MARK = "# lifecycle-route "
EMPTY_SLOT = "127.0.0.1:1"  # a slot with nothing in it: disabled, never contacted
LABEL = "org.lifecycle"

RuntimeAPI = Callable[[str], str]  # one command line (several joined by `;`) -> HAProxy's answer


class EdgeTimeouts(BaseModel):
    """How long the edge waits, in seconds. `http_request_s` bounds a request head (and a connection's
    silence before its first request), `body_s` (None: `http_request_s`) the body's first buffer from the
    last header: a stalled client gets 408 and is cut. `server_s` bounds a silent backend (504)."""

    connect_s: float = 5.0
    client_s: float = 60.0
    server_s: float = 60.0
    http_request_s: float = 10.0
    body_s: float | None = None
    http_keep_alive_s: float = 30.0
    queue_s: float = 5.0
    check_interval_s: float = 2.0


class EdgeConfig(BaseModel):
    """What haproxy.cfg is rendered from (bind address, admin socket, limits, DNS)."""

    bind_host: str = "0.0.0.0"
    port: int = EDGE_PORT
    socket_path: str = f"{SOCKET_DIR}/admin.sock"
    max_body_bytes: int | None = None
    max_header_bytes: int | None = None  # a larger request head gets 431 (None: HAProxy's 16 KB buffer, 400)
    timeouts: EdgeTimeouts = EdgeTimeouts()
    nameserver: str | None = DOCKER_DNS  # None: servers are IP:port (an edge on the host, tests)
    maxconn: int = 4096
    max_clients: int = 2000  # a connection made while this many are open gets 503 (the earlier ones are served)


class Upstream(BaseModel):
    """What a slot routes to: `host:port` (container name on docker) and who that is."""

    address: str
    container: str | None = None
    deployment_id: str | None = None


class Route(BaseModel):
    """The live slot and what each slot holds; the edge's state, stored in its config file."""

    live: Literal["a", "b"] | None = None
    slots: dict[str, Upstream] = {}

    def spare(self) -> Literal["a", "b"]:
        """The slot a new backend goes into: the one that is not live."""
        return "b" if self.live == "a" else "a"

    def live_upstream(self) -> Upstream | None:
        return self.slots.get(self.live) if self.live else None


class ServerState(BaseModel):
    """One slot as HAProxy sees it (`show stat`): status UP/DOWN/MAINT/…, last check, sessions now."""

    name: str
    status: str
    check_status: str
    address: str
    sessions: int


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _json(code: str, message: str) -> str:
    """The tail of a `deny`/`return` rule that answers `{"error_code", "message"}` JSON, as the app does."""
    return f"content-type application/json string '{json.dumps({'error_code': code, 'message': message})}'"


def render_config(config: EdgeConfig, route: Route) -> str:
    """haproxy.cfg for the edge: one frontend, backend `serving` with the slots `a` and `b`.

    The route's JSON is the first line. Why `wait-for-body` (`option http-buffer-request` with a timeout
    of its own): HAProxy waits for the body (one buffer) before it picks a server, so a slow client costs
    the backend nothing and the request can be retried (`retry-on`: a keep-alive connection the backend
    closed meanwhile). The refusals (503, 431, 413) come before it: no body is awaited for them.
    """
    t, dns, head = config.timeouts, config.nameserver is not None, config.max_header_bytes
    busy = _json("SERVICE_UNAVAILABLE", f"edge: {config.max_clients} connections open")
    lines = [ROUTE_MARK + route.model_dump_json(), "global",
             f"    stats socket {config.socket_path} mode 600 level admin", "    stats timeout 10s",
             f"    maxconn {config.maxconn}", "    hard-stop-after 30s", "    log stdout format raw local0 info",
             # A head is parsed only if it fits one buffer (less the 1 KB rewrite reserve): room for twice the limit.
             *([f"    tune.bufsize {max(16_384, 2 * head + 1024)}"] if head is not None else []), ""]
    lines += ["resolvers docker", f"    nameserver dns1 {config.nameserver}", "    hold valid 5s", "    hold nx 5s",
              "    accepted_payload_size 8192", ""] if dns else []
    lines += ["defaults", "    mode http", "    log global", "    option httplog", "    option dontlog-normal",
              f"    timeout connect {_ms(t.connect_s)}", f"    timeout client {_ms(t.client_s)}",
              f"    timeout server {_ms(t.server_s)}", f"    timeout http-request {_ms(t.http_request_s)}",
              f"    timeout http-keep-alive {_ms(t.http_keep_alive_s)}", f"    timeout queue {_ms(t.queue_s)}",
              "    option forwardfor", "    option redispatch 1", "    retries 2",
              "    retry-on conn-failure empty-response", "",
              "frontend edge", f"    bind {config.bind_host}:{config.port}",
              # Marked when accepted (session scope), so only connections beyond the cap are refused.
              f"    tcp-request connection set-var(sess.over) int(1) if {{ fe_conn gt {config.max_clients} }}",
              f"    http-request deny deny_status 503 {busy} if {{ var(sess.over) -m int 1 }}"]
    if head is not None:  # the head as the server counts it, less method and version (2.6 has no req.hdrs_len)
        too_big = _json("REQUEST_HEADER_FIELDS_TOO_LARGE", f"edge: request head larger than {head} bytes")
        lines += ["    http-request set-var(txn.url_len) url,length", f"    http-request deny deny_status 431 "
                  f"{too_big} if {{ req.hdrs,length,add(txn.url_len) gt {head} }}"]
    if config.max_body_bytes is not None:
        too_long = _json("REQUEST_TOO_LARGE", f"edge: request body larger than {config.max_body_bytes} bytes")
        lines.append(f"    http-request return status 413 {too_long} "
                     f"if {{ req.hdr_val(content-length) gt {config.max_body_bytes} }}")
    lines += [f"    http-request wait-for-body time {_ms(t.http_request_s if t.body_s is None else t.body_s)}",
              "    http-request set-header X-Forwarded-Proto http", "    default_backend serving", "",
              f"backend {BACKEND}", "    option httpchk GET /health", "    http-check expect status 200",
              f"    default-server check inter {_ms(t.check_interval_s)} fall 3 rise 2"
              + (" resolvers docker init-addr last,libc,none" if dns else "")]
    for slot in SLOTS:
        address = upstream.address if (upstream := route.slots.get(slot)) else EMPTY_SLOT
        lines.append(f"    server {slot} {address}" + ("" if route.live == slot else " disabled"))
    return "\n".join(lines) + "\n"


def route_of(config_text: str) -> Route:
    """The route a rendered config carries (an empty Route for a file without one)."""
    first = config_text.split("\n", 1)[0]
    return Route.model_validate_json(first.removeprefix(ROUTE_MARK)) if first.startswith(ROUTE_MARK) else Route()


def parse_stat(csv_text: str) -> list[ServerState]:
    """The slots of backend `serving` from `show stat` (CSV with a `# ` header line)."""
    lines = [ln for ln in csv_text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("# "):
        raise LifecycleError(f"edge: unexpected `show stat` answer: {csv_text[:200]!r}")
    header = lines[0][2:].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]
    return [ServerState(name=r["svname"], status=r.get("status", ""), check_status=r.get("check_status", ""),
                        address=r.get("addr", ""), sessions=int(r.get("scur") or 0))
            for r in rows if r.get("pxname") == BACKEND and r.get("svname") in SLOTS]


def command(api: RuntimeAPI, line: str) -> str:
    """Run a command line through the runtime API; an answer that reads as an error raises.

    Raises:
        LifecycleError: HAProxy refused the command (its answer is quoted).
    """
    errors = ("no such", "unknown command", "require", "permission denied", "invalid", "unable", "cannot", "not found")
    if any(word in (answer := api(line)).lower() for word in errors):
        raise LifecycleError(f"edge: `{line}` failed: {answer.strip()}")
    return answer


def server_states(api: RuntimeAPI) -> list[ServerState]:
    return parse_stat(api("show stat"))  # the health of both slots now (rollouts, `lifecycle status`)


def switch_commands(slot: str, ip: str, port: int, fqdn: str | None) -> list[str]:
    """The runtime-API commands that make `slot` live at ip:port and retire the other slot.

    The new slot is marked healthy before it leaves maintenance (it passed its smoke test), so it takes
    requests at once, not after `rise` checks; the old slot in maintenance gets no new request.
    """
    other = "b" if slot == "a" else "a"
    cmds = [f"set server {BACKEND}/{slot} fqdn {fqdn}"] if fqdn else []
    return [*cmds, f"set server {BACKEND}/{slot} addr {ip} port {port}", f"set server {BACKEND}/{slot} health up",
            f"set server {BACKEND}/{slot} state ready", f"set server {BACKEND}/{other} state maint"]


def switch(api: RuntimeAPI, route: Route, upstream: Upstream, ip: str, port: int, fqdn: str | None = None) -> Route:
    """Route every next request to `upstream` (reached at ip:port now); returns the new route.

    Raises:
        LifecycleError: a command was refused; the slots are then as the last successful command left them.
    """
    slot = route.spare()
    command(api, "; ".join(switch_commands(slot, ip, port, fqdn)))
    return Route(live=slot, slots={**route.slots, slot: upstream})


def wait_drained(api: RuntimeAPI, slot: str, timeout_s: float = 10.0) -> bool:
    """Wait until `slot` has no session left (its in-flight requests answered); False at the timeout."""
    deadline = time.monotonic() + timeout_s
    while any(s.name == slot and s.sessions for s in server_states(api)) and time.monotonic() <= deadline:
        time.sleep(0.05)
    return not any(s.name == slot and s.sessions for s in server_states(api))


def socket_api(path: str | Path, timeout_s: float = 5.0) -> RuntimeAPI:
    """The runtime API of an edge on this machine (its unix socket)."""

    def send(line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(line.encode() + b"\n")
            data = b"".join(iter(lambda: sock.recv(65536), b""))  # until HAProxy closes
        return data.decode(errors="replace")

    return send


# Runs inside the edge container (the base image has python3, not socat).
_EXEC = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(5)\ns.connect(sys.argv[1])\n"
         "s.sendall(sys.argv[2].encode() + b'\\n')\nb = b''\nwhile c := s.recv(65536):\n    b += c\n"
         "sys.stdout.write(b.decode(errors='replace'))\n")


def container_api(container: Any, socket_path: str = f"{SOCKET_DIR}/admin.sock") -> RuntimeAPI:
    """The runtime API of an edge container, through `docker exec`; a failed exec raises LifecycleError."""

    def send(line: str) -> str:
        code, output = container.exec_run(["python3", "-c", _EXEC, socket_path, line], user=f"{EDGE_UID}:{EDGE_UID}")
        text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
        if code != 0:
            raise LifecycleError(f"edge {container.name}: runtime API unreachable (exit {code}): {text.strip()[-300:]}")
        return text

    return send


def start_local(config: EdgeConfig, route: Route, folder: Path, haproxy: str = "haproxy") -> subprocess.Popen[bytes]:
    """An edge as a process on this machine (own process group; the container's config, servers as
    IP:port), listening when this returns. Raises LifecycleError when HAProxy rejects it or does not start."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "haproxy.cfg"
    path.write_text(render_config(config, route))
    check = subprocess.run([haproxy, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise LifecycleError(f"edge config {path} rejected: {(check.stderr or check.stdout).strip()[-500:]}")
    with open(folder / "haproxy.log", "ab") as log:
        proc = subprocess.Popen([haproxy, "-W", "-db", "-f", str(path)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    host = "127.0.0.1" if config.bind_host in ("0.0.0.0", "") else config.bind_host
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LifecycleError(f"haproxy exited ({proc.returncode}): {(folder / 'haproxy.log').read_text()[-500:]}")
        try:
            socket.create_connection((host, config.port), timeout=0.5).close()
            if Path(config.socket_path).exists():
                return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise LifecycleError(f"haproxy did not listen on {host}:{config.port} within 10 s")


def read_config(edge: Any) -> str:
    """The edge container's config file ("" when it has none)."""
    import docker

    try:
        stream, _ = edge.get_archive(f"{CONFIG_DIR}/{CONFIG_NAME}")
    except docker.errors.NotFound:
        return ""
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        return (member.read().decode() if (member := tar.extractfile(CONFIG_NAME)) else "")


def read_route(edge: Any) -> Route:
    return route_of(read_config(edge))  # what the edge container routes to


def write_config(edge: Any, config: EdgeConfig, route: Route) -> None:
    """Store the route in the edge's config file (root-owned, world-readable), read at the next start."""
    buf, data = io.BytesIO(), render_config(config, route).encode()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(CONFIG_NAME)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        tar.addfile(info, io.BytesIO(data))
    edge.put_archive(CONFIG_DIR, buf.getvalue())


def create_edge(client: Any, name: str, image: str, network: str, publish: tuple[str, int], config: EdgeConfig,
                route: Route, labels: dict[str, str] | None = None) -> Any:
    """Create and start the edge from the base image (no build): uid 10001, no capabilities, admin socket
    on a tmpfs of that uid, stopped with SIGUSR1 (HAProxy's soft stop).

    Raises:
        LifecycleError: the port cannot be published, the image has no haproxy, or it did not start.
    """
    import docker

    spec = spec_of(image, config, publish)
    container = client.containers.create(
        image, ["haproxy", "-W", "-db", "-f", f"{CONFIG_DIR}/{CONFIG_NAME}"], name=name, network=network,
        ports={f"{config.port}/tcp": publish}, user=f"{EDGE_UID}:{EDGE_UID}", stop_signal="SIGUSR1",
        labels={f"{LABEL}.role": "edge", f"{LABEL}.edge-spec": spec, **(labels or {})},
        tmpfs={SOCKET_DIR: f"size=1m,uid={EDGE_UID},gid={EDGE_UID},mode=0700"},
        restart_policy={"Name": "unless-stopped"}, cap_drop=["ALL"], security_opt=["no-new-privileges"],
        healthcheck={"test": ["CMD", "python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', "
                              f"{config.port}), 2)"], "interval": 10_000_000_000, "timeout": 3_000_000_000})
    try:
        write_config(container, config, route)
        container.start()
    except docker.errors.APIError as exc:
        container.remove(force=True)
        hint = " (no haproxy in the base image: scripts/docker_setup.sh)" if "executable file" in str(exc) else ""
        raise LifecycleError(f"edge {name}: cannot start on {publish[0]}:{publish[1]} "
                             f"({exc.explanation or exc}){hint}") from exc
    wait_listening(container, config)
    return container


def spec_of(image: str, config: EdgeConfig, publish: tuple[str, int]) -> str:
    """The label value `create_edge` gives a container made from these settings."""
    return stable_hash(image, render_config(config, Route()), list(publish), length=12)


def wait_listening(container: Any, config: EdgeConfig, timeout_s: float = 20.0) -> None:
    """Wait until the edge's runtime API answers; LifecycleError (with its log) when it exits or never does."""
    deadline = time.monotonic() + timeout_s
    api = container_api(container, config.socket_path)
    while time.monotonic() < deadline:
        container.reload()
        if container.status in ("exited", "dead"):
            break
        try:
            if "pxname" in api("show stat"):
                return
        except LifecycleError:
            pass
        time.sleep(0.1)
    tail = container.logs(tail=10).decode(errors="replace").strip()
    raise LifecycleError(f"edge {container.name} did not start (status {container.status}): {tail}")


def switch_edge(edge: Any, config: EdgeConfig, upstream: Upstream, ip: str) -> Route:
    """Switch a running edge container to `upstream` (name:port, at `ip` now), then store the route.

    Raises:
        LifecycleError: HAProxy refused the switch; the stored route is left as it was.
    """
    host, _, port = upstream.address.rpartition(":")
    route = switch(container_api(edge, config.socket_path), read_route(edge), upstream, ip, int(port),
                   fqdn=host if config.nameserver else None)
    write_config(edge, config, route)
    return route
