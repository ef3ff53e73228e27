"""The edge benchmark's HAProxy variants: parsed up front, added to the product's rendered config only
while a start is open, and accepted by `haproxy -c` (when haproxy is installed)."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from benchmarks import serve_edge
from tasks import haproxy as hx

CONFIG = hx.EdgeConfig(bind_host="127.0.0.1", port=18080, socket_path="/tmp/edge-test.sock", nameserver=None)
ROUTE = hx.Route(live="a", slots={"a": hx.Upstream(address="127.0.0.1:18081")})


def test_variants_parse_and_reject_unknown_names() -> None:
    assert serve_edge.variants("default, nbthread1,nbthread1-cpu1") == ["default", "nbthread1", "nbthread1-cpu1"]
    assert serve_edge.haproxy_variant("default") == ("", [])
    assert serve_edge.haproxy_variant("nbthread1") == ("nbthread 1 unpinned", ["    nbthread 1"])
    assert serve_edge.haproxy_variant("nbthread1-cpu0")[1] == ["    nbthread 1", "    cpu-map 1/1 0"]
    with pytest.raises(argparse.ArgumentTypeError):
        serve_edge.variants("default,nbthread2")


def test_global_lines_apply_only_inside_and_keep_the_route() -> None:
    plain = hx.render_config(CONFIG, ROUTE)
    with serve_edge._global_lines(serve_edge.haproxy_variant("nbthread1-cpu1")[1]):
        text = hx.render_config(CONFIG, ROUTE)
    assert hx.render_config(CONFIG, ROUTE) == plain  # restored
    assert "\nglobal\n    nbthread 1\n    cpu-map 1/1 1\n" in text
    assert text.replace("    nbthread 1\n    cpu-map 1/1 1\n", "") == plain
    assert hx.route_of(text) == ROUTE


@pytest.mark.parametrize("name", ["default", "nbthread1", "nbthread1-cpu0"])
def test_haproxy_accepts_each_variant(tmp_path: Path, name: str, haproxy: str) -> None:
    with serve_edge._global_lines(serve_edge.haproxy_variant(name)[1]):
        (tmp_path / "haproxy.cfg").write_text(hx.render_config(CONFIG, ROUTE))
    check = subprocess.run([haproxy, "-c", "-q", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr or check.stdout


def test_record_edge_keeps_the_tabular_names_and_labels_the_rest() -> None:
    rows: list[str] = []
    run = {"rps": 900.0, "p50_ms": 1.0, "p99_ms": 5.0}
    serve_edge.record_edge(lambda name, *a, **kw: rows.append(name), run, {"default": run}, 8, trees=200)
    serve_edge.record_edge(lambda name, *a, **kw: rows.append(name), run, {"nbthread1-cpu1": run}, 8,
                           model="linear model")
    assert rows == [
        "serve.edge.rps (through the HAProxy edge, 1 process pinned to CPU 0, c=8, 200 trees, 1 row)",
        "serve.edge.p99 (through the HAProxy edge, c=8)",
        "serve.edge.rps (through the HAProxy edge, nbthread 1 on CPU 1, linear model, 1 process pinned to CPU 0, "
        "c=8, 1 row)",
        "serve.edge.p99 (through the HAProxy edge, nbthread 1 on CPU 1, linear model, c=8)",
    ]
