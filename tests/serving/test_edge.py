"""The edge proxy (serving/edge.py) as a real process in front of two real HTTP backends, switched by SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.tasks.test_serving import free_port

EDGE = Path(__file__).resolve().parents[2] / "serving" / "edge.py"


class Named(BaseHTTPRequestHandler):
    """Answers with its server's name and what it received; `/close` answers with Connection: close."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(length)
        self._answer({"backend": self.server.name, "body": data.decode(), "path": self.path,
                      "chunked": "Transfer-Encoding" in self.headers, "auth": self.headers.get("Authorization")})

    def do_GET(self) -> None:  # noqa: N802
        self._answer({"backend": self.server.name, "path": self.path})

    def _answer(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def backend(name: str) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Named)
    server.name = name
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def edge(tmp_path):
    """A running edge on a free port; yields (url, route file, process)."""
    route = tmp_path / "route.json"
    route.write_text(json.dumps({"backend": None}))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(EDGE), "--host", "127.0.0.1", "--port", str(port),
                             "--route", str(route), "--max-body", "2048"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", route, proc
    proc.terminate()
    proc.wait(timeout=10)


def switch(route: Path, proc: subprocess.Popen, address: str | None) -> None:
    route.write_text(json.dumps({"backend": address}))
    os.kill(proc.pid, signal.SIGHUP)
    time.sleep(0.2)


def test_requests_follow_the_route_on_the_same_keep_alive_connection(edge):
    url, route, proc = edge
    (a, addr_a), (b, addr_b) = backend("blue"), backend("green")
    try:
        with httpx.Client(base_url=url, timeout=5) as client:
            none = client.get("/health")
            assert none.status_code == 503 and "no backend" in none.json()["message"]
            switch(route, proc, addr_a)
            first = client.post("/invocations", json={"x": 1}, headers={"Authorization": "Bearer t"})
            assert first.json() == {"backend": "blue", "body": '{"x":1}', "path": "/invocations", "chunked": False,
                                    "auth": "Bearer t"}
            # a backend's Connection: close is not passed on: the client keeps its connection
            closing = client.get("/close")
            assert closing.json()["backend"] == "blue" and closing.headers["connection"] == "keep-alive"
            switch(route, proc, addr_b)
            assert client.get("/version").json()["backend"] == "green"  # same client connection, next backend
            assert len(client._transport._pool.connections) == 1

            def chunks():
                yield b'{"rows": ['
                yield b"1, 2, 3"
                yield b"]}"

            resp = client.post("/invocations", content=chunks(), headers={"Content-Type": "application/json"})
            assert resp.json()["body"] == '{"rows": [1, 2, 3]}' and resp.json()["chunked"] is False
            too_big = client.post("/invocations", content=b"x" * 4096)
            assert too_big.status_code == 413 and too_big.json()["error_code"] == "REQUEST_TOO_LARGE"
        nobody = f"127.0.0.1:{free_port()}"
        switch(route, proc, nobody)
        gone = httpx.get(f"{url}/health", timeout=5)
        assert gone.status_code == 502 and nobody in gone.json()["message"]
    finally:
        a.shutdown()
        b.shutdown()


def test_malformed_requests_get_400_and_the_connection_closes(edge):
    url, route, proc = edge
    a, addr_a = backend("blue")
    switch(route, proc, addr_a)
    host, port = url.removeprefix("http://").split(":")
    try:
        for raw in (b"GARBAGE\r\n\r\n", b"POST /x HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
                    b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(raw)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 "), answer
    finally:
        a.shutdown()
