"""How ``attach`` asks for a dashboard given with ``--dashboard``: a real HTTP server each time.

A head started just before ``attach --wait-nodes`` opens its dashboard seconds after its GCS
(CI saw the docs' rehearsal refused for that); a dashboard that is up but refuses the token is
an answer, not worth waiting for.
"""
from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from hybridray.cluster.attachment import _dashboard
from hybridray.exceptions import ClusterError
from hybridray.cluster.ports import free_ports


def _server(port: int, status: int, hits: list[str]) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.headers.get("Authorization", ""))
            body = json.dumps({"ray_version": "2.60.0"} if status == 200 else {}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)


@pytest.fixture
def token(tmp_path):
    path = tmp_path / "token"
    path.write_text("sekrit\n")
    return path


def _serve_later(port: int, status: int, hits: list[str], after_s: float) -> list:
    servers = []

    def run():
        time.sleep(after_s)
        servers.append(_server(port, status, hits))
        servers[0].serve_forever(poll_interval=0.1)

    threading.Thread(target=run, daemon=True).start()
    return servers


def test_a_given_dashboard_that_opens_late_is_waited_for(token):
    port = free_ports(1)[0]
    hits: list[str] = []
    servers = _serve_later(port, 200, hits, after_s=2.0)
    try:
        url = _dashboard(f"http://127.0.0.1:{port}/", "127.0.0.1", token, True, print,
                         until=time.monotonic() + 60)
    finally:
        if servers:
            servers[0].shutdown()
            servers[0].server_close()
    assert url == f"http://127.0.0.1:{port}"
    assert hits == ["Bearer sekrit"]


def test_without_a_wait_a_dashboard_not_up_is_refused_at_once(token):
    port = free_ports(1)[0]
    with pytest.raises(ClusterError, match=rf"--dashboard http://127.0.0.1:{port}: no Ray "
                       r"dashboard answers \(.*refused.*\); give its URL"):
        _dashboard(f"http://127.0.0.1:{port}", "127.0.0.1", token, True, print)


def test_a_dashboard_that_refuses_the_token_is_not_waited_for(token):
    port = free_ports(1)[0]
    hits: list[str] = []
    server = _server(port, 401, hits)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    try:
        with pytest.raises(ClusterError, match="it refused the token"):
            _dashboard(f"http://127.0.0.1:{port}", "127.0.0.1", token, True, print,
                       until=time.monotonic() + 60)
    finally:
        server.shutdown()
        server.server_close()
    assert len(hits) == 1  # asked once: an answer, however unwelcome, ends the wait
