"""`serve`'s dynamic batching: shared runs, the bounded queue, request timeouts, drain on SIGTERM.

Answers are checked against `Session.encode` of each request alone, in this process. Servers are
real uvicorn servers on loopback: a subprocess (as `embdeploy serve` runs) where no fault is
injected, uvicorn in a thread of this process where the model run is made to block (a mock, only
to hold a run while the queue fills); nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time

import numpy as np
import pytest
from test_runtime import TEXTS, build_exports
from test_serve import HOST, call, start_server, stop_server

from embdeploy.errors import EmbdeployError
from embdeploy.export.validate import tolerance_for
from embdeploy.runtime import Session

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
prom_parser = pytest.importorskip("prometheus_client.parser")

TOL = tolerance_for("float32", "cpu")
# One short text per request, of different lengths (runs pad to their longest).
SHORT = [f"{w} troponin rose after the {n} test" for n in ("first", "second", "blood", "chest x ray")
         for w in ("hyperkalemia", "a", "the patient had a fever and")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return build_exports(tmp_path_factory.mktemp("batching"), tmp_path_factory.getbasetemp() / "embdeploy-cache",
                         masked_lm=False)


@pytest.fixture(scope="module")
def session(exports):
    return Session(exports.swap, providers="cpu")


def metric_samples(port) -> dict:
    """{(sample name, frozenset(labels)): value} from GET /metrics, read with prometheus-client's parser."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in prom_parser.text_string_to_metric_families(text) for s in family.samples}


def hammer(port, jobs, threads: int):
    """Send `jobs` [(path, body)] from `threads` threads at once (each its own keep-alive connection): answers by index."""
    answers, lock, start = {}, threading.Lock(), threading.Barrier(threads)
    todo = iter(range(len(jobs)))

    def loop():
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        start.wait()
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                break
            answers[i] = call(conn, "POST", *jobs[i])
        conn.close()

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    return answers


# --------------------------------------------------------------------------- tokenized once


def test_tokenize_each_then_pad_is_tokenize(session):
    long_text = " ".join(["troponin rose"] * 80)  # over the model's 128 positions: truncated
    texts = TEXTS + [long_text]
    rows = session.tokenize_each(texts)
    want = session.tokenize(texts)
    got = session.pad(rows)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert [r.length for r in rows] == session.token_counts(texts)
    assert rows[-1].length > session.max_length == len(rows[-1].ids)
    short = session.tokenize_each(texts, max_length=6)
    np.testing.assert_array_equal(session.pad(short)["input_ids"], session.tokenize(texts, max_length=6)["input_ids"])


# --------------------------------------------------------------------------- shared runs, real server


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    log = tmp_path_factory.mktemp("batching-log") / "server.log"
    proc, port = start_server(exports.swap, log, log_level="warning", batching={"max_wait_ms": 20.0})
    try:
        yield port
    finally:
        stop_server(proc)


def test_concurrent_requests_share_runs_and_each_answer_is_its_own(server, session):
    want = {t: session.encode([t])["sentence_embedding"][0] for t in SHORT}
    pairs = session.encode(SHORT[:2])["sentence_embedding"]
    jobs = []
    for rep in range(6):
        for i, t in enumerate(SHORT):
            if i % 3 == 0:
                jobs.append(("/v1/embeddings", {"input": t, "encoding_format": "float"}))
            elif i % 3 == 1:
                jobs.append(("/v1/encode", {"texts": [t]}))
            else:
                jobs.append(("/v1/encode", {"texts": SHORT[:2]}))  # two texts: their rows stay in order
    before = metric_samples(server)
    answers = hammer(server, jobs, threads=12)
    assert len(answers) == len(jobs)
    for i, (path, body) in enumerate(jobs):
        status, got = answers[i]
        assert status == 200, got
        if path == "/v1/embeddings":
            vec, expected = np.asarray(got["data"][0]["embedding"], np.float32), want[body["input"]]
        elif len(body["texts"]) == 1:
            vec, expected = np.asarray(got["data"][0], np.float32), want[body["texts"][0]]
        else:
            vec, expected = np.asarray(got["data"], np.float32), pairs
        np.testing.assert_allclose(vec, expected, atol=TOL.atol, rtol=TOL.rtol, err_msg=str(body))
    after = metric_samples(server)

    def delta(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    runs = delta("embdeploy_batch_requests_count")
    alone = delta("embdeploy_batch_requests_bucket", le="1.0")
    texts = sum(1 if p == "/v1/embeddings" or len(b["texts"]) == 1 else 2 for p, b in jobs)
    assert delta("embdeploy_batch_texts_sum") == texts
    assert delta("embdeploy_batch_requests_sum") == len(jobs)
    assert runs < len(jobs) and alone < runs, (runs, alone)  # some runs held more than one request
    assert delta("embdeploy_tokens_total") == sum(len(r.ids) for p, b in jobs
                                                 for r in session.tokenize_each(b.get("texts") or [b.get("input")]))
    assert after[("embdeploy_queue_texts", frozenset())] == 0


def test_a_lone_request_is_bit_identical_to_encode(server, session):
    status, got = call(server, "POST", "/v1/encode", {"texts": TEXTS})
    assert status == 200
    want = session.encode(TEXTS)
    np.testing.assert_array_equal(np.asarray(got["data"], np.float32), want["sentence_embedding"])
    np.testing.assert_array_equal(np.asarray(got["attention_mask"]), want["attention_mask"])


def test_no_batching_runs_each_request_alone_exactly_as_encode(exports, session, tmp_path):
    proc, port = start_server(exports.swap, tmp_path / "server.log", log_level="warning",
                              batching={"enabled": False})
    try:
        jobs = [("/v1/encode", {"texts": [t]}) for t in SHORT] * 2
        answers = hammer(port, jobs, threads=8)
        for i, (_, body) in enumerate(jobs):
            status, got = answers[i]
            assert status == 200, got
            np.testing.assert_array_equal(np.asarray(got["data"], np.float32),
                                          session.encode(body["texts"])["sentence_embedding"])
        samples = metric_samples(port)
        runs = samples[("embdeploy_batch_requests_count", frozenset())]
        assert runs == len(jobs) == samples[("embdeploy_batch_requests_bucket", frozenset({("le", "1.0")}))]
    finally:
        stop_server(proc)


# --------------------------------------------------------------------------- a held run: queue full, timeouts


@contextlib.contextmanager
def held_server(session, monkeypatch, **app_options):
    """create_app(session, **app_options) served by uvicorn in a thread, with Session.run blocking until
    `release` is set; yields (port, entered, release): `entered` is set when a run has started."""
    import uvicorn

    from embdeploy.runtime.serve import create_app

    entered, release = threading.Event(), threading.Event()
    real = Session.run

    def held_run(self, *args, **kwargs):
        entered.set()
        release.wait(120)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Session, "run", held_run)
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(session, **app_options), log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield port, entered, release
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)
        sock.close()


def in_background(port, path, body):
    """Send a request from a thread; .result() waits for (status, headers, parsed body)."""
    import concurrent.futures

    def send():
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read())
        finally:
            conn.close()

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(send)
    pool.shutdown(wait=False)
    return future


def wait_for(predicate, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_full_queue_is_503_with_retry_after(session, monkeypatch):
    with held_server(session, monkeypatch, max_batch=2, batching={"max_queue": 2}) as (port, entered, release):
        running = in_background(port, "/v1/encode", {"texts": TEXTS[:2]})
        assert entered.wait(60), "the first request never reached the model"
        queued = in_background(port, "/v1/encode", {"texts": TEXTS[2:4]})
        wait_for(lambda: metric_samples(port)[("embdeploy_queue_texts", frozenset())] == 2, "2 queued texts")
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        conn.request("POST", "/v1/embeddings", body=json.dumps({"input": "one more"}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 503, body
        assert int(resp.getheader("Retry-After")) >= 1
        message = body["error"]["message"]
        assert "the server is busy: 2 texts are queued and this request adds 1, the queue holds 2 (--max-queue)" in message
        assert "retry after" in message and body["error"]["type"] == "server_error"
        release.set()
        want = session.encode(TEXTS[:4])["sentence_embedding"]
        for future, rows in ((running, slice(0, 2)), (queued, slice(2, 4))):
            status, _, got = future.result(120)
            assert status == 200
            np.testing.assert_allclose(np.asarray(got["data"], np.float32), want[rows], atol=TOL.atol, rtol=TOL.rtol)
        status, got = call(port, "POST", "/v1/embeddings", {"input": "one more", "encoding_format": "float"})
        assert status == 200


def test_a_request_over_its_time_is_503_when_queued_and_504_when_running(session, monkeypatch):
    with held_server(session, monkeypatch, batching={"request_timeout": 1.0}) as (port, entered, release):
        running = in_background(port, "/v1/encode", {"texts": [TEXTS[0]]})
        assert entered.wait(60)
        queued = in_background(port, "/v1/encode", {"texts": [TEXTS[1]]})
        status, headers, got = running.result(60)
        assert status == 504 and "the model did not finish this request within 1 s (--request-timeout)" in \
            got["error"]["message"]
        status, headers, got = queued.result(60)
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert "the request waited 1 s in the queue (--request-timeout) without reaching the model" in \
            got["error"]["message"]
        wait_for(lambda: metric_samples(port)[("embdeploy_queue_texts", frozenset())] == 0, "the queue to empty")
        release.set()
        status, got = call(port, "POST", "/v1/encode", {"texts": [TEXTS[2]]})
        assert status == 200
        np.testing.assert_array_equal(np.asarray(got["data"], np.float32),
                                      session.encode([TEXTS[2]])["sentence_embedding"])


def test_one_bad_run_fails_only_its_own_request(session, monkeypatch):
    """A run of several requests that fails is retried request by request: only the culprit gets the 500."""
    import uvicorn

    from embdeploy.runtime.serve import create_app

    boom = session.tokenize_each("boom")[0].ids
    real = Session.run
    held, release = threading.Event(), threading.Event()
    sizes = []

    def run(self, feeds, *args, **kwargs):
        ids = feeds["input_ids"]
        sizes.append(len(ids))
        if not held.is_set():  # hold the first run so the next requests queue up together
            held.set()
            release.wait(120)
        if any(row[:len(boom)].tolist() == boom for row in ids):
            raise RuntimeError("simulated ORT failure")
        return real(self, feeds, *args, **kwargs)

    monkeypatch.setattr(Session, "run", run)
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(session), log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server to start")
        first = in_background(port, "/v1/encode", {"texts": ["first"]})
        assert held.wait(60)
        texts = ["fine", "boom", "also fine"]
        futures = [in_background(port, "/v1/encode", {"texts": [t]}) for t in texts]
        wait_for(lambda: metric_samples(port)[("embdeploy_queue_texts", frozenset())] == 3, "3 queued texts")
        release.set()
        assert first.result(60)[0] == 200
        for t, future in zip(texts, futures):
            status, _, got = future.result(60)
            if t == "boom":
                assert status == 500 and got["error"]["type"] == "server_error"
            else:
                assert status == 200
                np.testing.assert_array_equal(np.asarray(got["data"], np.float32),
                                              session.encode([t])["sentence_embedding"])
        assert sizes == [1, 3, 1, 1, 1], sizes  # the held run, the shared run that failed, each request again
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)
        sock.close()


# --------------------------------------------------------------------------- drain on SIGTERM


def test_sigterm_answers_every_request_in_flight_then_exits_0(exports, session, tmp_path):
    """Requests whose bodies are still arriving when SIGTERM comes are read, queued, run and answered
    (200 each, equal to encode), no new connection is accepted, and the process exits 0."""
    log = tmp_path / "server.log"
    proc, port = start_server(exports.swap, log, log_level="info")
    texts = SHORT[:8]
    conns, bodies = [], []
    try:
        for t in texts:
            body = json.dumps({"texts": [t]}).encode()
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            conn.putrequest("POST", "/v1/encode")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            conn.send(body[:5])  # the request is in flight: its handler waits for the rest
            conns.append(conn)
            bodies.append(body)
        in_flight = ("embdeploy_requests_in_flight", frozenset())
        wait_for(lambda: metric_samples(port)[in_flight] == len(texts) + 1, "8 requests in flight (+ /metrics)")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "Shutting down" in log.read_text(), "uvicorn to start its shutdown")

        def refused() -> bool:
            try:
                socket.create_connection((HOST, port), timeout=5).close()
                return False
            except OSError:
                return True

        wait_for(refused, "the listening socket to close")  # no new connections, while the 8 are still open
        results = [None] * len(texts)

        def finish(i):
            conns[i].send(bodies[i][5:])
            resp = conns[i].getresponse()
            results[i] = (resp.status, json.loads(resp.read()))

        pool = [threading.Thread(target=finish, args=(i,)) for i in range(len(texts))]
        for t in pool:
            t.start()
        for t in pool:
            t.join(120)
        for t, (status, got) in zip(texts, results):
            assert status == 200, got
            np.testing.assert_allclose(np.asarray(got["data"], np.float32), session.encode([t])["sentence_embedding"],
                                       atol=TOL.atol, rtol=TOL.rtol)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        for conn in conns:
            conn.close()
        if proc.poll() is None:
            stop_server(proc)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("options, message", [
    ({"max_queue": 0}, "max_queue must be a positive integer, got 0"),
    ({"max_wait_ms": -1}, "max_wait_ms must be a non-negative number, got -1"),
    ({"request_timeout": 0}, "request_timeout must be a positive number, got 0"),
    ({"max_batch_tokens": 1.5}, "max_batch_tokens must be a positive integer, got 1.5"),
    ({"max_wait": 3}, "unknown batching option(s) 'max_wait'; known: enabled, max_batch_texts"),
])
def test_bad_batching_options_are_refused_with_the_reason(session, options, message):
    from embdeploy.runtime.serve import create_app

    with pytest.raises(EmbdeployError) as e:
        create_app(session, batching=options)
    assert message in str(e.value)


def test_a_queue_smaller_than_one_request_is_refused(session):
    from embdeploy.runtime.serve import create_app

    with pytest.raises(EmbdeployError, match=r"max_queue \(8 texts\) is less than max_batch \(64 texts per request\)"):
        create_app(session, batching={"max_queue": 8})


def test_accepted_connections_send_without_nagle_delay():
    """The listening socket says it is TCP, so asyncio sets TCP_NODELAY on every accepted connection:
    without it a response body waited ~40 ms behind its headers (Nagle's algorithm and delayed ACKs)."""
    import asyncio

    from embdeploy.runtime.serve import bind_socket

    async def accept_one():
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = bind_socket(HOST, 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        _, writer = await asyncio.open_connection(HOST, listener.getsockname()[1])
        try:
            return await asyncio.wait_for(seen, 30)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accept_one()) != 0
