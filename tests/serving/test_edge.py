"""The edge container (tasks/haproxy.py, `-m docker`): HAProxy from the base image in front of plain
backend containers on a network of the test's own, switched the way a rollout switches it, polled
through the published port during a failed and a good rollout; timeouts through the published port;
the route survives a restart of the edge."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tasks import haproxy as hx
from tests.fixtures.docker import BASE_IMAGE
from tests.fixtures.polling import Poller

# A backend as small as the base image allows: its name on every path, /health 200, /slow sleeps 5 s.
SERVER = """
import json, os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(5)
        body = json.dumps({"backend": os.environ["NAME"], "xff": self.headers.get("X-Forwarded-For")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Setup:
    """A network, backends on it and one edge; everything removed at the end."""

    def __init__(self, client: Any) -> None:
        self.client, self.tag = client, secrets.token_hex(3)
        self.network = client.networks.create(f"lifecycle-edge-test-{self.tag}", driver="bridge")
        self.containers: list[Any] = []
        self.port = free_port()
        self.config = hx.EdgeConfig(max_body_bytes=2048, timeouts=hx.EdgeTimeouts(
            http_request_s=1.0, server_s=2.0, check_interval_s=0.5))

    def backend(self, name: str, command: list[str] | None = None) -> tuple[Any, hx.Upstream, str]:
        """(container, upstream, its IP on the network) of a started backend."""
        container = self.client.containers.run(
            BASE_IMAGE, command or ["python3", "-c", SERVER], name=f"lifecycle-edge-test-{self.tag}-{name}",
            environment={"NAME": name}, network=self.network.name, user="10001:10001", detach=True)
        self.containers.append(container)
        container.reload()
        ip = container.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"]
        return container, hx.Upstream(address=f"{container.name}:8080", container=container.id, deployment_id=name), ip

    def edge(self, route: hx.Route) -> Any:
        edge = hx.create_edge(self.client, f"lifecycle-edge-test-{self.tag}", BASE_IMAGE, self.network.name,
                              ("127.0.0.1", self.port), self.config, route)
        self.containers.append(edge)
        return edge

    def close(self) -> None:
        for container in self.containers:
            container.remove(force=True)
        self.network.remove()


@pytest.fixture
def setup(docker_base_url: str) -> Iterator[Setup]:
    from tasks.docker_images import docker_client

    made = Setup(docker_client(docker_base_url))
    yield made
    made.close()


def wait_for(url: str, backend: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).json().get("backend") == backend:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} does not answer from {backend}")


def wait_healthy(container: Any, timeout_s: float = 20) -> None:
    probe = ["python3", "-c",
             "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=1)"]
    deadline = time.monotonic() + timeout_s
    while container.exec_run(probe).exit_code != 0:
        assert time.monotonic() < deadline, f"{container.name} not healthy"
        time.sleep(0.1)




@pytest.mark.docker
def test_published_port_answers_throughout_a_failed_and_a_good_rollout(setup: Setup):
    _, blue, _ = setup.backend("blue")
    edge = setup.edge(hx.Route(live="a", slots={"a": blue}))
    url = f"http://127.0.0.1:{setup.port}"
    wait_for(f"{url}/version", "blue")
    assert httpx.get(f"{url}/version").json()["xff"]  # X-Forwarded-For reaches the backend
    assert {b["HostIp"] for b in edge.attrs["NetworkSettings"]["Ports"]["8080/tcp"]} == {"127.0.0.1"}
    assert edge.attrs["Config"]["User"] == "10001:10001" and edge.attrs["HostConfig"]["CapDrop"] == ["ALL"]

    poller = Poller(url, pause_s=0.005)
    poller.start()
    try:
        time.sleep(0.5)
        # A failed rollout: the new backend dies before it is healthy; the edge is never touched.
        broken, _, _ = setup.backend("broken", ["python3", "-c", "raise SystemExit(3)"])
        assert broken.wait(timeout=20)["StatusCode"] == 3
        assert hx.read_route(edge).live_upstream() == blue
        time.sleep(0.5)
        # A good rollout: the spare slot gets green, then blue goes to maintenance and drains.
        blue_container = setup.containers[0]
        green_container, green, green_ip = setup.backend("green")
        wait_healthy(green_container)  # the rollout's health wait and smoke test
        route = hx.switch_edge(edge, setup.config, green, green_ip)
        assert route.live == "b" and hx.read_route(edge) == route
        assert hx.wait_drained(hx.container_api(edge), "a", timeout_s=5)
        blue_container.stop(timeout=5)  # what the rollout does next
        time.sleep(1.0)
    finally:
        poller.stop.set()
        poller.join(timeout=15)
    assert not poller.errors, poller.errors[:3]
    assert set(poller.statuses) == {200} and poller.statuses[200] > 20, poller.statuses
    assert poller.order == ["blue", "green"]
    states = {s.name: s for s in hx.server_states(hx.container_api(edge))}
    assert states["b"].status.startswith("UP") and states["a"].status == "MAINT"

    # The stored route survives a restart of the edge (a daemon restart does the same).
    edge.restart(timeout=5)
    hx.wait_listening(edge, setup.config)
    wait_for(f"{url}/version", "green")


@pytest.mark.docker
def test_stalled_client_and_silent_backend_are_cut_at_the_configured_timeouts(setup: Setup):
    _, blue, _ = setup.backend("blue")
    setup.edge(hx.Route(live="a", slots={"a": blue}))
    url = f"http://127.0.0.1:{setup.port}"
    wait_for(f"{url}/version", "blue")
    with socket.create_connection(("127.0.0.1", setup.port), timeout=10) as sock:
        t0 = time.monotonic()
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: edge\r\nContent-Length: 100\r\n\r\n{\"inputs\":")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert 0.9 <= took < 2.5, took
    t0 = time.monotonic()
    assert httpx.get(f"{url}/slow", timeout=10).status_code == 504
    assert 1.8 <= time.monotonic() - t0 < 4
    big = httpx.post(f"{url}/invocations", content=b"x" * 4096)
    assert big.status_code == 413 and "larger than 2048 bytes" in big.json()["message"]
