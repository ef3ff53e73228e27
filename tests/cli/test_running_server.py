"""`lifecycle run` records its runs on the Prefect server of `lifecycle up` only while that server answers."""

from __future__ import annotations

import socket
import sys

from cli.server import STATE_FILE, UpState, running_api_url, up_server_for_run
from tasks.processes import Started, start_process, stop_process, wait_http


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_state(home, url: str, server: Started) -> None:
    state = UpState(profile="local", prefect_url=url, processes=[server])
    (home / STATE_FILE).write_text(state.model_dump_json())


def test_a_live_server_is_used_and_a_stopped_missing_or_unreadable_one_is_not(tmp_path, monkeypatch):
    assert running_api_url(tmp_path) is None  # never started
    (tmp_path / STATE_FILE).write_text('{"profile": "local"')  # `up` writing it right now
    assert running_api_url(tmp_path) is None
    site = tmp_path / "site"
    (site / "api").mkdir(parents=True)
    (site / "api" / "health").write_text("true")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = start_process("prefect-server", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                              "--directory", str(site)], env={}, log=tmp_path / "server.log")
    try:
        wait_http(server, f"{url}/health", timeout_s=30)
        write_state(tmp_path, url, server)
        assert running_api_url(tmp_path) == url
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(restore_defaults={PREFECT_API_URL}):  # the test session's server: none
            assert up_server_for_run(tmp_path) == url
        _another_server_is_named_so_up_is_not_used(tmp_path, monkeypatch)
        (site / "api" / "health").unlink()  # up, but not healthy: not used
        assert running_api_url(tmp_path) is None
    finally:
        stop_process(server, grace_s=5)
    (site / "api" / "health").write_text("true")
    assert running_api_url(tmp_path) is None  # recorded, but stopped


def _another_server_is_named_so_up_is_not_used(home, monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://team-server:4200/api"}):  # a Prefect profile or config
        assert up_server_for_run(home) is None
    monkeypatch.setenv("PREFECT_API_URL", "")  # Prefect's way to ask for a temporary server
    assert up_server_for_run(home) is None
    monkeypatch.delenv("PREFECT_API_URL")
