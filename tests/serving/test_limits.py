"""Bounds on every client and a crashed worker, on real `python -m serving` processes (gunicorn + uvicorn).

Each test talks raw sockets where the point is what a misbehaving client sends (a head that never
ends, a body that trickles, nothing at all) and checks what the server answers and when it hangs up.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from serving.model import ServingModel, sample_row
from tests.serving.servers import running, workers
from tests.serving.test_app import write_model_dir

FAST = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "keep_alive_s": 1.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("limits") / "model")


@pytest.fixture(scope="module")
def body(model_dir) -> bytes:
    return orjson.dumps({"dataframe_records": [sample_row(ServingModel.load(model_dir).schema)]})


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def read_response(sock: socket.socket) -> bytes:
    """One whole response: the head, then as many body bytes as its content-length says."""
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_16_mb_header_gets_431_and_costs_the_server_one_buffer(model_dir):
    with running(model_dir) as (url, _, _):
        sock = connect(url)
        sent = {"bytes": 0}

        def send() -> None:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                for _ in range(256):  # 16 MB in 64 KB pieces
                    sock.sendall(b"a" * 65536)
                    sent["bytes"] += 65536
            except OSError:
                pass  # the server hung up, as it should

        sender = threading.Thread(target=send)
        sender.start()
        answer = read_all(sock)
        sender.join(timeout=10)
        sock.close()
        assert status_of(answer) == 431, answer[:200]
        assert b"request head larger than 32768 bytes" in answer
        assert sent["bytes"] < 16 * 2**20  # cut long before the end
        assert httpx.get(f"{url}/health").status_code == 200


def test_idle_slow_head_and_slow_body_are_cut_at_their_timeouts(model_dir, body):
    with running(model_dir, limits=FAST) as (url, _, log):
        idle = connect(url)  # says nothing at all
        start = time.monotonic()
        assert read_all(idle) == b""
        assert 0.7 < time.monotonic() - start < 3.5

        head = connect(url)  # a head that trickles, one byte every 0.2 s
        start = time.monotonic()
        head.sendall(b"GET /health HTTP/1.1\r\n")
        answer = b""
        for _ in range(30):
            try:
                head.sendall(b"X")
            except OSError:
                break
            head.settimeout(0.2)
            try:
                answer += head.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        head.settimeout(5)
        answer += read_all(head)
        assert status_of(answer) == 408 and b"request head not complete within 1 s" in answer
        assert 0.7 < time.monotonic() - start < 3.5

        slow = connect(url)  # the whole head, then 10 of 1000 body bytes
        slow.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b" " * 10)
        start = time.monotonic()
        answer = read_all(slow)
        assert status_of(answer) == 408 and b"request body not complete within 1 s" in answer
        assert 0.7 < time.monotonic() - start < 3.5

        with httpx.Client(base_url=url) as client:  # a well-behaved keep-alive client is unaffected
            for _ in range(3):
                ok = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
                assert ok.status_code == 200
                time.sleep(0.3)
    assert "Traceback" not in log.read_text()


def test_past_the_connection_cap_new_clients_get_503_while_old_ones_answer(model_dir):
    limits = {"max_connections": 4, "keep_alive_s": 10.0, "header_timeout_s": 10.0}
    with running(model_dir, limits=limits) as (url, _, _), httpx.Client(base_url=url) as old:
        assert old.get("/health").status_code == 200
        idle = [connect(url) for _ in range(3)]  # 4 open now
        time.sleep(0.2)
        with httpx.Client(base_url=url) as new:
            refused = new.get("/health")
            assert refused.status_code == 503 and "connection limit (4)" in refused.json()["message"]
            assert refused.headers["connection"] == "close"
        assert old.get("/health").status_code == 200  # an existing connection still answers
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 200


class Load:
    """Threads posting predictions on keep-alive connections (reconnecting after an error), timestamped."""

    def __init__(self, url: str, body: bytes, threads: int = 4) -> None:
        self.url, self.body, self.stop = url, body, threading.Event()
        self.ok: list[float] = []
        self.failed: list[float] = []
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self) -> None:
        while not self.stop.is_set():
            with httpx.Client(base_url=self.url, timeout=5) as client:
                while not self.stop.is_set():
                    try:
                        resp = client.post("/invocations", content=self.body,
                                           headers={"Content-Type": "application/json"})
                        (self.ok if resp.status_code == 200 else self.failed).append(time.monotonic())
                    except httpx.HTTPError:
                        self.failed.append(time.monotonic())
                        break

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)


@pytest.mark.parametrize("n", [1, 2])
def test_a_worker_killed_by_sigsegv_under_load_is_replaced_within_5_s(model_dir, body, n):
    with running(model_dir, workers=n) as (url, proc, log), Load(url, body) as load:
        before = workers(proc)
        assert len(before) == n
        time.sleep(1.0)
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGSEGV)
        killed = time.monotonic()
        time.sleep(6.0)
        after = workers(proc)
        recovered = [t for t in load.ok if t > killed]
        assert proc.poll() is None  # the arbiter lives on
    assert recovered, f"no answer after the crash: {log.read_text()[-1500:]}"
    assert recovered[0] - killed < 5.0
    late_failures = [t for t in load.failed if t > recovered[0] + 0.5]
    assert not late_failures, f"{len(late_failures)} failures after recovery"
    assert len(after) == n and victim not in after  # the arbiter replaced the dead worker
    assert "SIGSEGV" in log.read_text()


def test_an_h2c_upgrade_offer_is_answered_in_http_1_1_with_its_body(model_dir, body):
    """`curl --http2` offers `Upgrade: h2c`; the body used to be lost (400) with a warning per request."""
    with running(model_dir) as (url, _, log):
        sock = connect(url)
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answer = read_response(sock)
        sock.close()
        assert status_of(answer) == 200 and b'"predictions"' in answer, answer[:300]
    assert "Unsupported upgrade" not in log.read_text()
