"""The HAProxy edge (tasks/haproxy.py): rendering and parsing without HAProxy, then a real `haproxy`
process on this machine in front of real HTTP backends: switching through the runtime API under load,
timeouts, forwarded headers, health checks. The host haproxy comes from scripts/haproxy_setup.sh (the
`haproxy` fixture), skipped only where it cannot be installed;
the edge container is tested in tests/serving/test_edge.py."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from lifecycle.errors import LifecycleError
from tasks import haproxy as hx
from tests.fixtures.polling import Poller


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Named(BaseHTTPRequestHandler):
    """Answers with its server's name, the path and the forwarded headers; `/slow` sleeps 3 s first."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms wait on delayed ACKs

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/health" and not self.server.healthy:  # type: ignore[attr-defined]
            self.send_error(503)
            return
        if self.path == "/slow":
            time.sleep(3)
        self._answer({"backend": self.server.name, "path": self.path,  # type: ignore[attr-defined]
                      "xff": self.headers.get("X-Forwarded-For"), "proto": self.headers.get("X-Forwarded-Proto")})

    def do_POST(self) -> None:  # noqa: N802
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer({"backend": self.server.name, "body": data.decode()})  # type: ignore[attr-defined]

    def _answer(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # health checks and cut clients close connections abruptly: expected here


def backend(name: str) -> tuple[ThreadingHTTPServer, int]:
    server = Quiet(("127.0.0.1", 0), Named)
    server.name, server.healthy = name, True  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def timeouts(**kw: float) -> hx.EdgeTimeouts:
    return hx.EdgeTimeouts(**{"http_request_s": 1.0, "server_s": 1.5, "check_interval_s": 0.2, **kw})


@pytest.fixture
def backends() -> Iterator[dict[str, tuple[ThreadingHTTPServer, int]]]:
    found = {name: backend(name) for name in ("blue", "green")}
    yield found
    for server, _ in found.values():
        server.shutdown()


@pytest.fixture
def edge(tmp_path: Path, backends, haproxy) -> Iterator[tuple[str, hx.EdgeConfig, hx.Route, hx.RuntimeAPI]]:
    """A host haproxy routing to `blue`; yields (url, config, route, runtime API)."""
    config = hx.EdgeConfig(bind_host="127.0.0.1", port=free_port(), socket_path=str(tmp_path / "admin.sock"),
                           max_body_bytes=2048, timeouts=timeouts(), nameserver=None)
    route = hx.Route(live="a", slots={"a": hx.Upstream(address=f"127.0.0.1:{backends['blue'][1]}",
                                                        deployment_id="blue")})
    proc = hx.start_local(config, route, tmp_path / "edge", haproxy)
    yield f"http://127.0.0.1:{config.port}", config, route, hx.socket_api(config.socket_path)
    proc.terminate()
    proc.wait(timeout=10)


# --- without haproxy -----------------------------------------------------------------------------------


def test_config_carries_the_route_and_disables_the_spare_slot():
    route = hx.Route(live="b", slots={"a": hx.Upstream(address="old:8080", container="c1", deployment_id="d1"),
                                      "b": hx.Upstream(address="new:8080", container="c2", deployment_id="d2")})
    text = hx.render_config(hx.EdgeConfig(max_body_bytes=1024), route)
    assert hx.route_of(text) == route and route.spare() == "a" and route.live_upstream().deployment_id == "d2"
    assert "    server a old:8080 disabled\n" in text and "    server b new:8080\n" in text
    for line in ("option forwardfor", "option httpchk GET /health", "timeout http-request 10000ms",
                 "timeout client 60000ms", "timeout server 60000ms", "timeout connect 5000ms",
                 "nameserver dns1 127.0.0.11:53", "resolvers docker init-addr last,libc,none",
                 "req.hdr_val(content-length) gt 1024", "stats socket /run/haproxy/admin.sock mode 600 level admin"):
        assert line in text, line
    host = hx.render_config(hx.EdgeConfig(nameserver=None), hx.Route())
    assert "resolvers" not in host and "    server a 127.0.0.1:1 disabled" in host and "return status 413" not in host
    assert hx.route_of("global\n") == hx.Route() and hx.Route().spare() == "a"


def test_the_docker_edge_is_rendered_from_the_targets_client_limits():
    from infra_blocks import ServingTarget
    from lifecycle.client_limits import ClientLimits
    from tasks.docker_serving import edge_config

    limits = ClientLimits(max_header_bytes=8192, header_timeout_s=3.0, body_timeout_s=90.0, keep_alive_s=2.0,
                          max_connections=50)
    config = edge_config(ServingTarget(kind="docker", workers=2, max_body_bytes=4096, limits=limits))
    assert (config.max_header_bytes, config.max_clients, config.maxconn) == (8192, 100, 4096)
    text = hx.render_config(config, hx.Route())
    for line in ("    timeout http-request 3000ms\n", "    http-request wait-for-body time 90000ms\n",
                 "    timeout http-keep-alive 2000ms\n", "    timeout client 90000ms\n",  # outlasts the body
                 "    tune.bufsize 17408\n", "{ fe_conn gt 100 }", "edge: 100 connections open",
                 "deny deny_status 431", "request head larger than 8192 bytes", "add(txn.url_len) gt 8192 }",
                 "req.hdr_val(content-length) gt 4096"):
        assert line in text, line
    assert text.index("deny_status 431") < text.index("wait-for-body")  # refused before a body is awaited
    many = edge_config(ServingTarget(kind="docker", workers=8, limits=ClientLimits(max_connections=1000)))
    assert (many.max_clients, many.maxconn) == (8000, 16000)  # room to accept, and 503, past the cap
    plain = hx.render_config(hx.EdgeConfig(), hx.Route())  # as the benchmarks and older callers build it
    assert "tune.bufsize" not in plain and "431" not in plain and "wait-for-body time 10000ms" in plain


def test_switch_commands_mark_the_new_slot_up_before_retiring_the_old() -> None:
    assert hx.switch_commands("b", "172.18.0.5", 8080, "lifecycle-x") == [
        "set server serving/b fqdn lifecycle-x", "set server serving/b addr 172.18.0.5 port 8080",
        "set server serving/b health up", "set server serving/b state ready", "set server serving/a state maint"]
    sent: list[str] = []

    def api(line: str) -> str:
        sent.append(line)
        return ""

    route = hx.switch(api, hx.Route(live="b", slots={}),
                      hx.Upstream(address="127.0.0.1:9"), "127.0.0.1", 9)
    assert route.live == "a" and sent[0].startswith("set server serving/a addr 127.0.0.1 port 9;")
    with pytest.raises(LifecycleError, match="No such server"):
        hx.command(lambda line: "No such server.\n", "set server serving/c state ready")


def test_show_stat_is_parsed_into_slot_states():
    csv = ("# pxname,svname,qcur,scur,status,check_status,addr\nedge,FRONTEND,,3,OPEN,,\n"
           "serving,a,0,2,UP,L7OK,127.0.0.1:5000\nserving,b,0,0,MAINT,,127.0.0.1:1\nserving,BACKEND,0,2,UP,,\n")
    assert hx.parse_stat(csv) == [
        hx.ServerState(name="a", status="UP", check_status="L7OK", address="127.0.0.1:5000", sessions=2),
        hx.ServerState(name="b", status="MAINT", check_status="", address="127.0.0.1:1", sessions=0)]
    with pytest.raises(LifecycleError, match="unexpected"):
        hx.parse_stat("Unknown command\n")


def test_rendered_configs_are_valid_haproxy(tmp_path: Path, haproxy):
    route = hx.Route(live="a", slots={"a": hx.Upstream(address="127.0.0.1:5000")})
    for config in (hx.EdgeConfig(max_body_bytes=1024, socket_path=str(tmp_path / "s")),
                   hx.EdgeConfig(nameserver=None, socket_path=str(tmp_path / "s")),
                   hx.EdgeConfig(max_header_bytes=1_048_576, timeouts=timeouts(body_s=30.0),
                                 socket_path=str(tmp_path / "s"))):
        path = tmp_path / "haproxy.cfg"
        path.write_text(hx.render_config(config, route))
        check = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        assert "WARNING" not in check.stderr + check.stdout, check.stderr + check.stdout


# --- a real haproxy ------------------------------------------------------------------------------------




def test_switch_and_switch_back_under_load_without_a_failed_request(edge, backends):
    url, config, route, api = edge
    green = hx.Upstream(address=f"127.0.0.1:{backends['green'][1]}", deployment_id="green")
    with httpx.Client(base_url=url, timeout=5) as client:
        first = client.get("/version").json()
        assert first == {"backend": "blue", "path": "/version", "xff": "127.0.0.1", "proto": "http"}
        poller = Poller(url)
        poller.start()
        try:
            time.sleep(0.3)
            switched = hx.switch(api, route, green, "127.0.0.1", backends["green"][1])
            assert switched.live == "b" and switched.live_upstream() == green
            # the same client connection goes on, to the new backend
            assert client.get("/version").json()["backend"] == "green"
            assert hx.wait_drained(api, "a", timeout_s=5)
            time.sleep(0.3)
            back = hx.switch(api, switched, route.slots["a"], "127.0.0.1", backends["blue"][1])  # a rollback
            assert back.live == "a"
            time.sleep(0.3)
        finally:
            poller.stop.set()
            poller.join(timeout=10)
        assert len(client._transport._pool.connections) == 1
    assert not poller.errors, poller.errors[:3]
    assert set(poller.statuses) == {200} and poller.statuses[200] > 50, poller.statuses
    assert poller.order == ["blue", "green", "blue"]
    states = {s.name: s.status for s in hx.server_states(api)}
    assert states["a"].startswith("UP") and states["b"] == "MAINT"


def test_a_client_that_stalls_mid_request_is_cut_at_the_http_request_timeout(edge):
    url, config, _, _ = edge
    host, port = url.removeprefix("http://").split(":")
    for raw in (b"GET /version HTTP/1.1\r\nHost: edge\r\nX-Half: ",  # stalls in its head
                b"POST /invocations HTTP/1.1\r\nHost: edge\r\nContent-Length: 100\r\n\r\n{\"inputs\":"):  # in its body
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            t0 = time.monotonic()
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(4096):  # until the edge closes the connection
                answer += chunk
            took = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        assert config.timeouts.http_request_s * 0.9 <= took < config.timeouts.http_request_s + 1.5, took


def test_a_silent_backend_is_answered_504_at_the_server_timeout(edge):
    url, config, _, _ = edge
    t0 = time.monotonic()
    resp = httpx.get(f"{url}/slow", timeout=10)
    assert resp.status_code == 504 and config.timeouts.server_s * 0.9 <= time.monotonic() - t0 < 3


def test_body_limit_and_health_checks(edge, backends):
    url, _, _, api = edge
    big = httpx.post(f"{url}/invocations", content=b"x" * 4096)
    assert big.status_code == 413 and big.json()["error_code"] == "REQUEST_TOO_LARGE"
    assert "larger than 2048 bytes" in big.json()["message"]
    assert httpx.post(f"{url}/invocations", content=b"x" * 100).json()["body"] == "x" * 100
    backends["blue"][0].healthy = False  # /health answers 503: the checks take the slot down
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and hx.server_states(api)[0].status != "DOWN":
        time.sleep(0.1)
    state = hx.server_states(api)[0]
    assert state.status == "DOWN" and state.check_status == "L7STS", state
    assert httpx.get(f"{url}/version").status_code == 503


def test_refused_commands_and_configs_raise(edge, tmp_path: Path, haproxy):
    _, _, _, api = edge
    with pytest.raises(LifecycleError, match="failed"):
        hx.command(api, "set server serving/nope state ready")
    with pytest.raises(LifecycleError, match="rejected"):
        hx.start_local(hx.EdgeConfig(bind_host="999.0.0.1", port=free_port(), socket_path=str(tmp_path / "s"),
                                     nameserver=None), hx.Route(), tmp_path / "bad", haproxy)


def test_past_the_client_cap_new_connections_get_503_while_old_ones_are_served(tmp_path: Path, backends, haproxy):
    config = hx.EdgeConfig(bind_host="127.0.0.1", port=free_port(), socket_path=str(tmp_path / "admin.sock"),
                           timeouts=timeouts(), nameserver=None, max_clients=3)
    route = hx.Route(live="a", slots={"a": hx.Upstream(address=f"127.0.0.1:{backends['blue'][1]}")})
    proc = hx.start_local(config, route, tmp_path / "edge", haproxy)
    url = f"http://127.0.0.1:{config.port}"
    try:
        with httpx.Client(base_url=url) as old:
            assert old.get("/version").status_code == 200
            idle = [socket.create_connection(("127.0.0.1", config.port)) for _ in range(2)]  # 3 open now
            time.sleep(0.2)
            refused = httpx.get(f"{url}/version")
            assert refused.status_code == 503 and refused.json()["error_code"] == "SERVICE_UNAVAILABLE"
            assert old.get("/version").json()["backend"] == "blue"  # the earlier connection is served
            for sock in idle:
                sock.close()
            time.sleep(0.2)
            assert httpx.get(f"{url}/version").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_head_over_the_limit_gets_431_and_body_and_head_have_their_own_timeouts(tmp_path: Path, backends,
                                                                                   haproxy):
    config = hx.EdgeConfig(bind_host="127.0.0.1", port=free_port(), socket_path=str(tmp_path / "admin.sock"),
                           timeouts=timeouts(body_s=2.0), nameserver=None, max_header_bytes=8192)
    route = hx.Route(live="a", slots={"a": hx.Upstream(address=f"127.0.0.1:{backends['blue'][1]}")})
    proc = hx.start_local(config, route, tmp_path / "edge", haproxy)
    url = f"http://127.0.0.1:{config.port}"

    def answer(head: bytes, then: bytes = b"") -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", config.port), timeout=10) as sock:
            t0 = time.monotonic()
            sock.sendall(head + then)
            data = b""
            while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
            return data, time.monotonic() - t0

    try:
        assert httpx.get(f"{url}/version", headers={"X-Big": "a" * 6000}).status_code == 200
        too_big = httpx.get(f"{url}/version", headers={"X-Big": "a" * 10_000})
        assert too_big.status_code == 431 and too_big.json() == {
            "error_code": "REQUEST_HEADER_FIELDS_TOO_LARGE", "message": "edge: request head larger than 8192 bytes"}
        # A head beyond the buffer (twice the limit) is refused by HAProxy's parser with its own 400.
        huge, _ = answer(b"GET /version HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 400 "), huge[:80]
        body = "x" * 200_000  # more than a buffer: forwarded once the buffer is full
        assert httpx.post(f"{url}/invocations", content=body, timeout=10).json()["body"] == body
        head, took_head = answer(b"GET /version HTTP/1.1\r\nHost: edge\r\nX-Half: ")
        assert head.startswith(b"HTTP/1.1 408 ") and 0.9 <= took_head < 1.8, (head[:40], took_head)
        half, took_body = answer(b"POST /invocations HTTP/1.1\r\nHost: edge\r\nContent-Length: 100\r\n\r\n{")
        assert half.startswith(b"HTTP/1.1 408 ") and 1.8 <= took_body < 3.0, (half[:40], took_body)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
