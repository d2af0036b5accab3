"""`serve`: the HTTP service in a real uvicorn process on loopback, checked against the in-process Session.

The server is started with `embdeploy.runtime.serve.serve` in a subprocess on a
free 127.0.0.1 port and stopped at the end of the module. Every answer must be
exactly what `Session.encode` gives for the same texts; every bad request a 4xx
with a message, after which the service still serves.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_runtime import TEXTS, _hammer, build_exports

from embdeploy.runtime import Session

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MAX_BATCH, MAX_CHARS = 8, 2000
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return build_exports(tmp_path_factory.mktemp("serve"), tmp_path_factory.getbasetemp() / "embdeploy-cache",
                         masked_lm=False)


@pytest.fixture(scope="module")
def session(exports):
    return Session(exports.swap, providers="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(onnx_dir, log, **options):
    """`serve(onnx_dir, **options)` in a subprocess on a free loopback port, once /healthz answers: (proc, port)."""
    port = _free_port()
    args = "".join(f", {k}={v!r}" for k, v in options.items())
    code = (f"from embdeploy.runtime.serve import serve; "
            f"serve({str(onnx_dir)!r}, host={HOST!r}, port={port}, providers='cpu'{args})")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if call(port, "GET", "/healthz")[0] == 200:
                return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"the server did not come up in 90s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    proc, port = start_server(exports.swap, log, max_batch=MAX_BATCH, max_chars=MAX_CHARS, log_level="warning")
    try:
        yield port
    finally:
        stop_server(proc)


def call(port_or_conn, method: str, path: str, body=None, headers=None):
    """(status, parsed JSON) of one request; a port opens a fresh connection."""
    conn = port_or_conn
    fresh = isinstance(port_or_conn, int)
    if fresh:
        conn = http.client.HTTPConnection(HOST, port_or_conn, timeout=60)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        if fresh:
            conn.close()


def test_health_and_metadata(server, session):
    status, health = call(server, "GET", "/healthz")
    assert status == 200 and health == {"status": "ok", "mode": "swap", "K": 3}
    status, meta = call(server, "GET", "/v1/metadata")
    assert status == 200
    local = session.metadata()
    for key in ("mode", "task", "V", "K", "H", "tokens", "base_fingerprint", "extension_fingerprint", "outputs"):
        assert meta[key] == local[key], key


def test_encode_equals_the_session(server, session):
    status, got = call(server, "POST", "/v1/encode", {"texts": TEXTS[:3]})
    assert status == 200 and got["output"] == "sentence_embedding" and got["shape"] == [3, 32]
    want = session.encode(TEXTS[:3])
    np.testing.assert_array_equal(np.asarray(got["data"], dtype=np.float32), want["sentence_embedding"])
    assert got["K"] == 3 and got["extension_fingerprint"] == session.metadata()["extension_fingerprint"]

    status, got = call(server, "POST", "/v1/encode", {"texts": TEXTS[3:], "output": "last_hidden_state", "max_length": 12})
    want = session.encode(TEXTS[3:], max_length=12)
    assert status == 200 and got["shape"] == list(want["last_hidden_state"].shape) and got["shape"][1] == 12
    np.testing.assert_array_equal(np.asarray(got["data"], dtype=np.float32), want["last_hidden_state"])
    np.testing.assert_array_equal(np.asarray(got["attention_mask"]), want["attention_mask"])


def test_openai_style_embeddings(server, session):
    status, got = call(server, "POST", "/v1/embeddings", {"input": TEXTS[0], "model": "clinical"})
    want = session.encode(TEXTS[0])
    assert status == 200 and got["object"] == "list" and got["model"] == "clinical"
    assert [d["index"] for d in got["data"]] == [0]
    np.testing.assert_array_equal(np.asarray(got["data"][0]["embedding"], dtype=np.float32), want["sentence_embedding"][0])
    assert got["usage"] == {"prompt_tokens": int(want["attention_mask"].sum()), "total_tokens": int(want["attention_mask"].sum())}


BAD = [
    # (method, path, body, status, message fragment)
    ("POST", "/v1/encode", b'{"texts": ["a",', 400, "not valid JSON (Expecting value at line 1 column 16)"),
    ("POST", "/v1/encode", b"\xff\xfe\x00", 400, "not UTF-8"),
    ("POST", "/v1/encode", b"", 400, "the request has no body"),
    ("POST", "/v1/encode", ["a"], 422, "must be a JSON object like"),
    ("POST", "/v1/encode", {}, 422, 'the field "texts" is missing'),
    ("POST", "/v1/encode", {"texts": "hello"}, 422, "texts must be a list of strings, got a JSON string"),
    ("POST", "/v1/encode", {"texts": ["a", 5]}, 422, "texts[1] must be a string, got a JSON number"),
    ("POST", "/v1/encode", {"texts": [None]}, 422, "texts[0] must be a string, got a JSON null"),
    ("POST", "/v1/encode", {"texts": []}, 422, "texts is an empty list"),
    ("POST", "/v1/encode", {"texts": ["ok", ""]}, 422, "texts[1] is empty"),
    ("POST", "/v1/encode", {"texts": ["  \n"]}, 422, "texts[0] is empty"),
    ("POST", "/v1/encode", {"texts": ["a"], "foo": 1}, 422, "unknown field(s) 'foo'; allowed fields: texts, output, max_length"),
    ("POST", "/v1/encode", {"texts": ["a"], "output": "pooler"}, 422,
     "output must be one of 'last_hidden_state', 'sentence_embedding', got \"pooler\""),
    ("POST", "/v1/encode", {"texts": ["a"], "max_length": "10"}, 422, 'max_length must be a positive integer, got "10"'),
    ("POST", "/v1/encode", {"texts": ["a"], "max_length": True}, 422, "max_length must be a positive integer, got true"),
    ("POST", "/v1/encode", {"texts": ["a"], "max_length": 4096}, 422, "max_length 4096 is more than the model's 128 positions"),
    ("POST", "/v1/encode", {"texts": ["a"] * (MAX_BATCH + 1)}, 413, f"texts has {MAX_BATCH + 1} texts, the limit is {MAX_BATCH}"),
    ("POST", "/v1/encode", {"texts": ["a" * (MAX_CHARS + 1)]}, 413, f"texts[0] has {MAX_CHARS + 1} characters, the limit is {MAX_CHARS}"),
    ("POST", "/v1/embeddings", {"input": 5}, 422, "input must be a list of strings, got a JSON number"),
    ("POST", "/v1/embeddings", {"input": ["a"], "encoding_format": "int8"}, 422, 'encoding_format must be "float" or "base64"'),
    ("POST", "/v1/embeddings", {"input": ["a"], "dimensions": 8}, 400, "dimensions is not supported"),
    ("POST", "/v1/embeddings", {"input": [101, 2000]}, 422, "input holds token ids"),
    ("POST", "/v1/embeddings", {"input": [[101, 2000]]}, 422, "input holds token ids"),
    ("POST", "/v1/embeddings", {"input": ["a"], "user": 7}, 422, "user must be a string"),
    ("GET", "/v1/encode", None, 405, "GET is not allowed on /v1/encode"),
    ("GET", "/v2/nothing", None, 404, "no route /v2/nothing; routes: GET /healthz"),
]


@pytest.mark.parametrize("method, path, body, status, message", BAD, ids=[f"{b[3]}-{b[4][:30]}" for b in BAD])
def test_bad_requests_get_4xx_and_the_service_keeps_serving(server, session, method, path, body, status, message):
    got_status, got = call(server, method, path, body)
    assert got_status == status, got
    assert message in got["error"]["message"], got["error"]["message"]
    assert got["error"]["type"] == "invalid_request_error"
    ok, answer = call(server, "POST", "/v1/encode", {"texts": ["still serving"]})
    assert ok == 200
    np.testing.assert_array_equal(np.asarray(answer["data"], np.float32), session.encode("still serving")["sentence_embedding"])


def test_oversized_body_is_refused_before_it_is_read(server):
    limit = MAX_BATCH * MAX_CHARS * 12 + (64 << 10)
    conn = http.client.HTTPConnection(HOST, server, timeout=30)
    try:  # declared, not sent: the server must answer from the header alone
        conn.putrequest("POST", "/v1/encode")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(limit + 1))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert f"the request body has {limit + 1} bytes, the limit is {limit}" in json.loads(resp.read())["error"]["message"]
    finally:
        conn.close()
    assert call(server, "GET", "/healthz")[0] == 200


def test_load_many_concurrent_clients(server, session):
    from embdeploy.export.validate import tolerance_for

    tol = tolerance_for("float32", "cpu")
    inputs = [TEXTS[i % len(TEXTS):][: 1 + i % MAX_BATCH] + TEXTS[: i % 3] for i in range(12)]
    expected = [session.encode(t)["sentence_embedding"] for t in inputs]
    local = threading.local()
    bad_answers = []

    def work(i):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(HOST, server, timeout=60)
        if i % 10 == 9:  # bad requests mixed into the load
            status, got = call(local.conn, "POST", "/v1/encode", {"texts": [""]})
            if status != 422:
                bad_answers.append((status, got))
            return
        status, got = call(local.conn, "POST", "/v1/encode", {"texts": inputs[i % len(inputs)]})
        assert status == 200, got
        # concurrent requests share runs, padded to their longest text: equal within the validation tolerance
        np.testing.assert_allclose(np.asarray(got["data"], np.float32), expected[i % len(inputs)],
                                   atol=tol.atol, rtol=tol.rtol)

    calls, errors, elapsed = _hammer(work, threads=16, seconds=300, max_calls=400)  # deadline: a hang guard only
    texts = sum(len(inputs[i % len(inputs)]) for i in range(calls) if i % 10 != 9)
    print(f"\nHTTP, 16 clients: {calls} requests ({texts} texts) in {elapsed:.2f}s = {calls / elapsed:.0f} req/s, "
          f"{texts / elapsed:.0f} texts/s")
    assert errors == [] and bad_answers == [] and calls == 400
    assert call(server, "GET", "/healthz")[0] == 200


def test_a_crash_inside_the_model_is_a_500_and_the_service_keeps_serving(session, monkeypatch):
    """create_app in this process (uvicorn in a thread), with the model run failing for one text."""
    import uvicorn

    from embdeploy.runtime.serve import create_app

    original = Session.run
    boom = session.tokenize_each("boom")[0].ids

    def run(self, feeds, *args, **kwargs):
        if feeds["input_ids"][0, :len(boom)].tolist() == boom:
            raise RuntimeError("simulated ORT failure")
        return original(self, feeds, *args, **kwargs)

    monkeypatch.setattr(Session, "run", run)
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(session), log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        status, got = call(port, "POST", "/v1/encode", {"texts": ["boom"]})
        assert status == 500 and got["error"] == {
            "message": "internal error (RuntimeError); the server keeps running, see its log", "type": "server_error"}
        status, got = call(port, "POST", "/v1/encode", {"texts": ["fine"]})
        assert status == 200
        np.testing.assert_array_equal(np.asarray(got["data"], np.float32), session.encode("fine")["sentence_embedding"])
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_tei_routes_answer_as_tei_does(server, session):
    """POST /embed (and /) with TEI's fields, GET /info, GET /health: what a TEI client sends and reads."""
    want = session.encode(TEXTS[:2])["sentence_embedding"].astype(np.float64)
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)
    for path in ("/embed", "/"):
        status, got = call(server, "POST", path, {"inputs": TEXTS[:2]})  # normalize defaults to true, as in TEI
        assert status == 200 and len(got) == 2
        np.testing.assert_allclose(np.asarray(got), unit, rtol=1e-6, atol=1e-6)
    status, got = call(server, "POST", "/embed", {"inputs": TEXTS[0], "normalize": False})
    np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=1e-6, atol=1e-6)
    status, info = call(server, "GET", "/info")
    assert status == 200 and info["max_input_length"] == session.max_length and info["max_client_batch_size"] == MAX_BATCH
    assert call(server, "GET", "/health")[0] == 200
    long_text = " ".join(["troponin"] * (session.max_length + 10))
    status, got = call(server, "POST", "/embed", {"inputs": [long_text]})
    assert status == 413 and 'or send "truncate": true' in got["error"]["message"]
    status, got = call(server, "POST", "/embed", {"inputs": [long_text], "truncate": True})
    assert status == 200 and len(got) == 1
    status, got = call(server, "POST", "/embed", {"inputs": ["a"], "normalize": "yes"})
    assert status == 422 and "normalize must be true or false" in got["error"]["message"]


def test_huggingface_hub_client_talks_to_the_tei_routes(server, session, monkeypatch):
    """huggingface_hub's InferenceClient, as a TEI user has it, pointed at embdeploy (on loopback: the hub's
    offline switch, which blocks every URL, is lifted for this client only)."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    client = hub.InferenceClient(base_url=f"http://{HOST}:{server}")
    got = np.asarray(client.feature_extraction(TEXTS[0], normalize=True))
    want = session.encode([TEXTS[0]])["sentence_embedding"][0].astype(np.float64)
    np.testing.assert_allclose(got.reshape(-1), want / np.linalg.norm(want), rtol=1e-6, atol=1e-6)
