"""`serve` under hostile or careless clients: client mistakes are 4xx (never a 500 or a logged traceback),
slow clients cannot starve it, nothing shows the server's paths, a taken port is a clear error.

A real uvicorn server in a subprocess on a free 127.0.0.1 port, with short timeouts so the test is quick.
Every loop here is bounded in count and time, and only loopback is contacted.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from test_runtime import build_exports
from test_serve import start_server, stop_server

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

HOST = "127.0.0.1"
HEADER_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return build_exports(tmp_path_factory.mktemp("serve-hard"), tmp_path_factory.getbasetemp() / "embdeploy-cache",
                         masked_lm=False)


def start(exports, log, **kw):
    return start_server(exports.swap, log, log_level="info", **kw)


def stop(proc):
    stop_server(proc)


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc, port = start(exports, log, header_timeout=HEADER_TIMEOUT, body_timeout=2.0, max_connections=1000)
    yield port, log
    stop(proc)


def request(port, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


@pytest.mark.parametrize("body, headers, status, says", [
    ('{"texts": ' + "[" * 50_000 + "]" * 50_000 + "}", None, 400, "nested too deeply"),
    ('{"texts": ["a"], "max_length": ' + "9" * 5000 + "}", None, 400, "cannot be read"),
    ('{"texts": ["fine", "\\ud800 alone"]}', None, 422, "texts[1] holds a lone surrogate (U+D800"),
    ('{"texts": ["a"]}', {"Content-Type": "text/plain"}, 415, "Content-Type must be application/json"),
    ('{"texts": ["a"]}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type must be application/json"),
], ids=["deep-nesting", "5000-digit-int", "lone-surrogate", "text-plain", "form"])
def test_client_mistakes_are_4xx_with_a_message(server, body, headers, status, says):
    port, log = server
    got, answer = request(port, "POST", "/v1/encode", body=body.encode(), headers=headers)
    assert got == status, answer
    assert says in answer["error"]["message"]
    assert request(port, "GET", "/healthz")[0] == 200
    assert "Traceback" not in log.read_text()


def test_the_openai_route_refuses_a_lone_surrogate_too(server):
    port, log = server
    got, answer = request(port, "POST", "/v1/embeddings", body=b'{"input": "\\udfff"}')
    assert got == 422 and "lone surrogate" in answer["error"]["message"]
    assert "Traceback" not in log.read_text()


def test_no_route_or_message_shows_a_server_path(server, exports):
    port, _ = server
    _, meta = request(port, "GET", "/v1/metadata")
    assert meta["path"] == exports.swap.name
    text = json.dumps(meta)
    assert str(exports.swap.parent) not in text and os.sep + "tmp" not in text


def test_a_slow_body_is_a_408(server):
    port, _ = server
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"te")
        s.settimeout(10)
        reply = b""
        deadline = time.monotonic() + 20  # guards a hang only
        while b"did not arrive" not in reply and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    text = reply.decode(errors="replace")
    assert text.startswith("HTTP/1.1 408") and "did not arrive within 2 s" in text


def test_a_slowloris_does_not_starve_the_server(server):
    """300 sockets that never finish their headers: /healthz still answers at once, and the server closes
    every one of them once the header timeout has passed."""
    port, _ = server
    slow = []
    try:
        for _ in range(300):
            s = socket.create_connection((HOST, port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never end
            slow.append(s)
        t = time.monotonic()
        assert request(port, "GET", "/healthz", timeout=20)[0] == 200
        assert time.monotonic() - t < 20  # a guard against a hang, not a timing assertion
        time.sleep(HEADER_TIMEOUT + 2.0)
        closed = 0
        for s in slow:
            s.settimeout(5)
            try:
                closed += s.recv(1) == b""
            except (ConnectionResetError, socket.timeout):
                closed += 1
        assert closed == len(slow), f"{len(slow) - closed} slow connections still open"
    finally:
        for s in slow:
            s.close()


def test_connections_past_the_cap_are_closed(exports, tmp_path):
    proc, port = start(exports, tmp_path / "log", max_connections=20, header_timeout=30.0)
    held = []
    try:
        for _ in range(30):
            held.append(socket.create_connection((HOST, port), timeout=10))
        time.sleep(0.5)
        closed = 0
        for s in held:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 10  # the 20 below the cap may stay open; every one past it is closed
    finally:
        for s in held:
            s.close()
        stop(proc)


def test_a_taken_port_is_a_clear_error(exports):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "embdeploy.cli", "serve", str(exports.swap), "--port", str(port),
                            "--providers", "cpu"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2, p.stderr
    assert "is already in use" in " ".join(p.stderr.split()) and "Traceback" not in p.stderr


def test_an_oversized_response_is_refused_before_the_model_runs(exports):
    """The response's size is known from the tokenized batch: a last_hidden_state too large is a 413 and the
    model is never called (a spy counts the calls)."""
    from starlette.testclient import TestClient

    from embdeploy.runtime import Session
    from embdeploy.runtime.serve import create_app

    session = Session(exports.swap, providers="cpu")
    calls = []
    real = Session.run

    def spy(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    Session.run = spy
    try:
        client = TestClient(create_app(session, max_values=500))
        r = client.post("/v1/encode", json={"texts": ["the troponin rose"] * 4, "output": "last_hidden_state"})
        assert r.status_code == 413 and "the response would hold" in r.json()["error"]["message"]
        assert calls == []
        r = client.post("/v1/encode", json={"texts": ["a"], "output": "last_hidden_state"})
        assert r.status_code == 200 and calls == [1]
    finally:
        Session.run = real
