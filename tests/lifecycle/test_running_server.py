"""`lifecycle run` records its runs on the Prefect server of `lifecycle up` only while that server answers."""

from __future__ import annotations

import socket
import sys

from lifecycle.cli_server import STATE_FILE, UpState, running_api_url
from lifecycle.processes import Started, start_process, stop_process, wait_http


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_state(home, url: str, server: Started) -> None:
    state = UpState(profile="local", prefect_url=url, processes=[server])
    (home / STATE_FILE).write_text(state.model_dump_json())


def test_a_live_server_is_used_and_a_stopped_or_missing_one_is_not(tmp_path):
    assert running_api_url(tmp_path) is None  # never started
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
        (site / "api" / "health").unlink()  # up, but not healthy: not used
        assert running_api_url(tmp_path) is None
    finally:
        stop_process(server, grace_s=5)
    (site / "api" / "health").write_text("true")
    assert running_api_url(tmp_path) is None  # recorded, but stopped


def test_choosing_the_server_imports_no_prefect():
    """Prefect reads its settings once, at import: the choice must be made before anything imports it."""
    import subprocess

    code = ("import sys, lifecycle.cli, lifecycle.cli_server, lifecycle.home; "
            "lifecycle.cli_server.running_api_url(lifecycle.home.lifecycle_home()); "
            "assert 'prefect' not in sys.modules, 'prefect imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
