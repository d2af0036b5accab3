"""`serve` with tenants: many vocabularies over one swap base, picked by the request's `model`.

Every answer is checked against that tenant's own single-tenant Session (`Session(swap,
extension=its dir).encode`), in this process. Three tables over one tiny base: the export's own
(K=3), tenant b (K=2), tenant c (K=4), each with its own new words, so a text answered with another
tenant's table or tokenizer would differ far beyond the tolerance (checked below too).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_runtime import TEXTS, _extension, build_exports
from test_serve import HOST, call, start_server, stop_server
from test_serve_batching import TOL, hammer, in_background, metric_samples, wait_for

from embdeploy.errors import EmbdeployError
from embdeploy.runtime import Session
from embdeploy.runtime.tenants import Tenants, parse_tenant_args, read_tenants_file

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

TOKENS_C = ["zorblax", "qwertyx", "glimmerine", "snorkelwise"]
# Texts with every tenant's new words (and base-only ones): each tenant tokenizes them its own way.
MIXED = TEXTS[:3] + ["zorblax and qwertyx met glimmerine", "snorkelwise cardiomyopathy troponin", "zzyzx rose"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    out = build_exports(root, tmp_path_factory.getbasetemp() / "embdeploy-cache", masked_lm=False)
    out.dir_c = _extension(TOKENS_C).save(root / "ext-c")
    return out


@pytest.fixture(scope="module")
def own(exports):
    """Each model's own single-tenant session: the reference every answer must match."""
    default = exports.swap.name
    return {default: Session(exports.swap, providers="cpu"),
            "b": Session(exports.swap, providers="cpu", extension=exports.dir_b),
            "c": Session(exports.swap, providers="cpu", extension=exports.dir_c)}


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    log = tmp_path_factory.mktemp("tenants-log") / "server.log"
    proc, port = start_server(exports.swap, log, log_level="warning", batching={"max_wait_ms": 20.0},
                              tenants={"b": str(exports.dir_b), "c": str(exports.dir_c)})
    try:
        yield port
    finally:
        stop_server(proc)


def test_the_tenants_answer_differently(own):
    """The reference is discriminating: every pair of models differs on texts with new words."""
    vectors = {name: s.encode(MIXED)["sentence_embedding"] for name, s in own.items()}
    names = list(vectors)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert np.abs(vectors[x] - vectors[y]).max() > 100 * TOL.atol, (x, y)


def test_mixed_tenant_traffic_every_answer_is_its_tenants_own(server, own, exports):
    default = exports.swap.name
    want = {(m, t): s.encode([t])["sentence_embedding"][0] for m, s in own.items() for t in MIXED}
    jobs = []
    for rep in range(4):
        for i, t in enumerate(MIXED):
            for m in own:
                route = i % 3
                named = m if (m != default or rep % 2) else None  # the default also without a model field
                if route == 0:
                    body = {"input": t, "encoding_format": "float"}
                    jobs.append(("/v1/embeddings", body | ({"model": named} if named else {}), m, t))
                elif route == 1:
                    jobs.append(("/v1/encode", {"texts": [t]} | ({"model": named} if named else {}), m, t))
                else:
                    jobs.append(("/embed", {"inputs": t, "normalize": False} | ({"model": named} if named else {}),
                                 m, t))
    before = metric_samples(server)
    answers = hammer(server, [(path, body) for path, body, _, _ in jobs], threads=12)
    for i, (path, body, m, t) in enumerate(jobs):
        status, got = answers[i]
        assert status == 200, (body, got)
        if path == "/v1/embeddings":
            assert got["model"] == (body.get("model") or default)
            vec = got["data"][0]["embedding"]
        elif path == "/v1/encode":
            assert got["model"] == (body.get("model") or default) and got["K"] == own[m].K
            vec = got["data"][0]
        else:
            vec = got[0]
        np.testing.assert_allclose(np.asarray(vec, np.float32), want[(m, t)], atol=TOL.atol, rtol=TOL.rtol,
                                   err_msg=f"{m}: {body}")
    after = metric_samples(server)
    for m in own:  # the request counter carries the model
        counted = sum(v - before.get(k, 0) for k, v in after.items()
                      if k[0] == "embdeploy_requests_total" and ("model", m) in k[1] and ("status", "200") in k[1])
        assert counted == sum(1 for *_, jm, _ in jobs if jm == m), m
    runs = after[("embdeploy_batch_requests_count", frozenset())] - before.get(("embdeploy_batch_requests_count", frozenset()), 0)
    assert runs < len(jobs)  # runs were shared (within a tenant: the answers above prove no run mixed them)


def test_models_are_listed_for_the_official_openai_client(server, own, exports):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://{HOST}:{server}/v1", api_key="unused", max_retries=0)
    listed = [m.id for m in client.models.list()]
    assert listed == [exports.swap.name, "b", "c"]
    assert client.models.retrieve("c").id == "c" and client.models.retrieve("c").owned_by == "embdeploy"
    got = client.embeddings.create(input=MIXED[3:5], model="c")  # base64, the client's default
    np.testing.assert_allclose(np.asarray([d.embedding for d in got.data], np.float32),
                               own["c"].encode(MIXED[3:5])["sentence_embedding"], atol=TOL.atol, rtol=TOL.rtol)
    with pytest.raises(openai.NotFoundError, match=r"unknown model 'legal'; this server has: .*, b, c"):
        client.embeddings.create(input=["a"], model="legal")
    with pytest.raises(openai.NotFoundError, match="unknown model 'legal'"):
        client.models.retrieve("legal")


@pytest.mark.parametrize("path, body", [
    ("/v1/encode", {"texts": ["a"], "model": "legal"}),
    ("/v1/embeddings", {"input": "a", "model": "legal"}),
    ("/embed", {"inputs": "a", "model": "legal"}),
])
def test_an_unknown_model_is_404_listing_the_known_ones(server, exports, path, body):
    status, got = call(server, "POST", path, body)
    assert status == 404 and got["error"]["type"] == "model_not_found"
    assert got["error"]["message"] == (f"unknown model 'legal'; this server has: {exports.swap.name}, b, c. Send one "
                                       "of them as model, or leave model out for the default")


def test_metadata_and_model_field_types(server, own):
    status, meta = call(server, "GET", "/v1/metadata?model=b")
    assert status == 200 and meta["model"] == "b" and meta["K"] == 2
    assert meta["tokens"] == own["b"].metadata()["tokens"] and meta["extension"] == "ext-b"
    status, got = call(server, "POST", "/v1/encode", {"texts": ["a"], "model": 3})
    assert status == 422 and got["error"]["message"] == "model must be a string, got a JSON number"


# --------------------------------------------------------------------------- refused set-ups


def test_tenants_need_a_swap_export(exports):
    from embdeploy.runtime.serve import create_app

    with pytest.raises(EmbdeployError, match=r"tenants need a swap export: onnx-merged is a 'merged' export"):
        create_app(Session(exports.merged, providers="cpu"), tenants={"b": exports.dir_b})


def test_the_cli_refuses_tenants_over_a_merged_export_with_exit_2(exports):
    p = subprocess.run([sys.executable, "-m", "embdeploy.cli", "serve", str(exports.merged), "--providers", "cpu",
                        "--port", "0", "--tenant", f"b={exports.dir_b}"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    text = " ".join((p.stdout + p.stderr).split())
    assert "tenants need a swap export" in text and "--mode swap" in text


def test_every_bad_tenant_is_reported_at_once(exports, tmp_path):
    tenants = Tenants(Session(exports.swap, providers="cpu"))
    with pytest.raises(EmbdeployError) as e:
        tenants.add_all({"foreign": exports.dir_foreign, "bad name!": exports.dir_b, "gone": tmp_path / "nothing",
                         exports.swap.name: exports.dir_b})
    message = str(e.value)
    assert message.startswith("cannot serve these tenants:")
    assert "tenant 'foreign'" in message and "fingerprint" in message
    assert "tenant name 'bad name!' is not allowed; a name is 1-64 characters" in message
    assert "tenant 'gone'" in message
    assert f"tenant name '{exports.swap.name}' is the export's own model" in message
    assert tenants.names() == [exports.swap.name]  # nothing half-added


def test_tenant_options_and_files(tmp_path):
    assert parse_tenant_args(["clinical=/data/clin", "legal = rel/legal"]) == {"clinical": Path("/data/clin"),
                                                                              "legal": Path("rel/legal")}
    with pytest.raises(EmbdeployError) as e:
        parse_tenant_args(["clinical", "a=x", "a=y"])
    assert "--tenant 'clinical' is not NAME=EXT_DIR" in str(e.value) and "--tenant 'a' is given twice" in str(e.value)
    (tmp_path / "t.json").write_text(json.dumps({"clinical": "clin", "legal": "/abs/legal"}))
    assert read_tenants_file(tmp_path / "t.json") == {"clinical": tmp_path / "clin", "legal": Path("/abs/legal")}
    (tmp_path / "t.txt").write_text("# tenants\nclinical = clin\n\nlegal=/abs/legal\n")
    assert read_tenants_file(tmp_path / "t.txt") == read_tenants_file(tmp_path / "t.json")
    (tmp_path / "bad.txt").write_text("clinical clin\n")
    with pytest.raises(EmbdeployError, match=r"line 1: 'clinical clin' is not name=extension dir"):
        read_tenants_file(tmp_path / "bad.txt")
    (tmp_path / "bad.json").write_text('{"clinical": 3}')
    with pytest.raises(EmbdeployError, match=r"the value of 'clinical' must be an extension directory"):
        read_tenants_file(tmp_path / "bad.json")


def test_the_cli_serves_a_tenants_file_and_logs_json_lines(exports, own, tmp_path):
    """`embdeploy serve SWAP --tenants-file FILE --access-log` (lines, a relative path) answers the tenant's own
    numbers and writes one JSON line per request, with the model."""
    (exports.dir_c.parent / "tenants.txt").write_text(f"c={exports.dir_c.name}\n")
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "cli.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "embdeploy.cli", "serve", str(exports.swap), "--providers", "cpu",
                             "--port", str(port), "--tenants-file", str(exports.dir_c.parent / "tenants.txt"),
                             "--access-log"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _up(port) or proc.poll() is not None, "the CLI server", 120)
        assert proc.poll() is None, (tmp_path / "cli.log").read_text()
        status, got = call(port, "POST", "/v1/encode", {"texts": [MIXED[3]], "model": "c"})
        assert status == 200
        np.testing.assert_array_equal(np.asarray(got["data"], np.float32), own["c"].encode([MIXED[3]])["sentence_embedding"])
        assert call(port, "POST", "/v1/encode", {"texts": ["a"], "model": "legal"})[0] == 404

        def lines():
            text = (tmp_path / "cli.log").read_text()
            return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{") and '"/v1/encode"' in ln]

        wait_for(lambda: len(lines()) == 2, "two access log lines")
        ok, missing = lines()
        assert {k: ok[k] for k in ("client", "method", "path", "status", "model")} == {
            "client": HOST, "method": "POST", "path": "/v1/encode", "status": 200, "model": "c"}
        assert ok["ms"] > 0 and ok["time"].endswith("Z") and missing["status"] == 404 and missing["model"] is None
    finally:
        stop_server(proc)


def _up(port) -> bool:
    try:
        return call(port, "GET", "/healthz")[0] == 200
    except OSError:
        return False


# --------------------------------------------------------------------------- admin: add and remove while serving


@pytest.fixture
def local_server(exports):
    """start(**create_app options) -> port: create_app over a fresh swap Session, uvicorn in a thread."""
    import uvicorn

    from embdeploy.runtime.serve import create_app

    running = []

    def start(**options):
        sock = socket.socket()
        sock.bind((HOST, 0))
        app = create_app(Session(exports.swap, providers="cpu"), **options)
        server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread, sock))
        wait_for(lambda: server.started, "the server to start")
        return sock.getsockname()[1]

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(30)
        sock.close()


def admin(port, method, name="", body=None, key="adm1n"):
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        conn.request(method, f"/admin/tenants{'/' + name if name else ''}",
                     body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_admin_routes_are_off_without_an_admin_key(local_server, exports):
    port = local_server()
    status, got = admin(port, "PUT", "c", {"path": str(exports.dir_c)})
    assert status == 403 and got["error"]["message"].startswith("the admin routes are off: start the server with "
                                                                "--admin-key KEY")
    assert call(port, "POST", "/v1/encode", {"texts": ["a"], "model": "c"})[0] == 200  # one model: any name


def test_admin_adds_replaces_and_removes_tenants_while_serving(local_server, exports, own):
    port = local_server(admin_keys=["adm1n"], api_keys=["user"])
    user = {"Authorization": "Bearer user"}
    assert admin(port, "PUT", "c", {"path": str(exports.dir_c)}, key="user")[0] == 401  # an API key is no admin key
    assert admin(port, "PUT", "c", {"path": str(exports.dir_c)}, key=None)[0] == 401
    status, got = admin(port, "PUT", "c", {"path": str(exports.dir_c)})
    assert status == 201 and got["model"] == "c" and got["K"] == 4 and got["replaced"] is False
    status, got = call(port, "POST", "/v1/encode", {"texts": MIXED, "model": "c"}, headers=user)
    assert status == 200
    np.testing.assert_array_equal(np.asarray(got["data"], np.float32), own["c"].encode(MIXED)["sentence_embedding"])
    status, got = admin(port, "PUT", "c", {"path": str(exports.dir_b)})  # same name, another table
    assert status == 200 and got["replaced"] is True and got["K"] == 2
    status, got = call(port, "POST", "/v1/encode", {"texts": MIXED, "model": "c"}, headers=user)
    np.testing.assert_array_equal(np.asarray(got["data"], np.float32), own["b"].encode(MIXED)["sentence_embedding"])
    status, listing = admin(port, "GET")
    assert status == 200 and [m["model"] for m in listing["models"]] == [exports.swap.name, "c"]
    assert admin(port, "DELETE", exports.swap.name)[0] == 409
    status, got = admin(port, "PUT", "x", {"path": str(exports.dir_foreign)})
    assert status == 422 and "fingerprint" in got["error"]["message"]
    status, got = admin(port, "PUT", "bad!name", {"path": str(exports.dir_b)})
    assert status == 422 and "tenant name 'bad!name' is not allowed" in got["error"]["message"]
    status, got = admin(port, "DELETE", "c")
    assert status == 200 and got == {"model": "c", "removed": True}
    status, got = call(port, "POST", "/v1/encode", {"texts": ["a"], "model": "c"}, headers=user)
    assert status == 200  # one model left: it answers any name again
    assert admin(port, "DELETE", "c")[0] == 404


def test_requests_in_flight_finish_on_the_table_they_started_with(local_server, exports, own, monkeypatch):
    """Tenant c's request is held inside its run; meanwhile c is replaced by b's table, then removed.
    The held request answers with c's own numbers; the next ones see the change."""
    real = Session.run
    entered, release = threading.Event(), threading.Event()

    def held(self, *args, **kwargs):
        if not entered.is_set():
            entered.set()
            release.wait(120)
        return real(self, *args, **kwargs)

    port = local_server(admin_keys=["adm1n"], tenants={"c": exports.dir_c, "b": exports.dir_b})
    monkeypatch.setattr(Session, "run", held)
    in_flight = in_background(port, "/v1/encode", {"texts": MIXED, "model": "c"})
    assert entered.wait(60)
    queued = in_background(port, "/v1/encode", {"texts": MIXED[:2], "model": "c"})
    wait_for(lambda: metric_samples(port)[("embdeploy_queue_texts", frozenset())] == 2, "c's second request queued")
    assert admin(port, "PUT", "c", {"path": str(exports.dir_b)})[0] == 200
    assert admin(port, "DELETE", "c")[0] == 200
    assert call(port, "POST", "/v1/encode", {"texts": ["a"], "model": "c"})[0] == 404
    release.set()
    for future, texts in ((in_flight, MIXED), (queued, MIXED[:2])):
        status, _, got = future.result(60)
        assert status == 200 and got["K"] == 4
        np.testing.assert_allclose(np.asarray(got["data"], np.float32), own["c"].encode(texts)["sentence_embedding"],
                                   atol=TOL.atol, rtol=TOL.rtol)


def test_queued_requests_of_three_models_share_runs_only_within_a_model(local_server, exports, own, monkeypatch):
    """Six requests (two per model) queue behind a held run, then run: one run per model, on its own table."""
    real = Session.run
    entered, release = threading.Event(), threading.Event()
    runs = []

    def recording(self, feeds, *args, **kwargs):
        if not entered.is_set():
            entered.set()
            release.wait(120)
        else:
            runs.append((self.extension_fingerprint, len(feeds["input_ids"])))
        return real(self, feeds, *args, **kwargs)

    port = local_server(tenants={"b": exports.dir_b, "c": exports.dir_c})
    monkeypatch.setattr(Session, "run", recording)
    first = in_background(port, "/v1/encode", {"texts": ["held"]})
    assert entered.wait(60)
    requests = [(m, t) for m in ("b", "c", None) for t in MIXED[3:5]]
    futures = [in_background(port, "/v1/encode", {"texts": [t]} | ({"model": m} if m else {})) for m, t in requests]
    wait_for(lambda: metric_samples(port)[("embdeploy_queue_texts", frozenset())] == len(requests), "6 queued texts")
    release.set()
    assert first.result(60)[0] == 200
    for (m, t), future in zip(requests, futures):
        status, _, got = future.result(60)
        assert status == 200
        np.testing.assert_allclose(np.asarray(got["data"], np.float32),
                                   own[m or exports.swap.name].encode([t])["sentence_embedding"],
                                   atol=TOL.atol, rtol=TOL.rtol)
    assert sorted(runs) == sorted((s.extension_fingerprint, 2) for s in own.values()), runs
