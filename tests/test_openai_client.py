"""The official `openai` Python client, unchanged, against `embdeploy serve` on loopback.

`client.embeddings.create(...)` with default arguments asks for base64 (little-endian float32) and
decodes it; the vectors must be exactly what `Session.encode` gives. The float format, `user`, the
refusal of `dimensions` and of token-id input come back as the client's own error types.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_runtime import TEXTS, build_exports
from test_serve import start_server, stop_server

from embdeploy.runtime import Session

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    exports = build_exports(tmp_path_factory.mktemp("openai"), tmp_path_factory.getbasetemp() / "embdeploy-cache",
                            masked_lm=False)
    proc, port = start_server(exports.swap, tmp_path_factory.mktemp("log") / "server.log", log_level="warning")
    try:
        yield exports, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-checked", max_retries=0)
    finally:
        stop_server(proc)


def test_default_arguments_give_the_sessions_vectors(served):
    exports, client = served
    want = Session(exports.swap, providers="cpu").encode(TEXTS[:3])
    got = client.embeddings.create(input=TEXTS[:3], model="clinical")  # the client's default: base64
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "clinical"
    np.testing.assert_array_equal(np.asarray([d.embedding for d in got.data], dtype=np.float32), want["sentence_embedding"])
    assert got.usage.prompt_tokens == int(want["attention_mask"].sum())


def test_float_format_one_string_and_user(served):
    exports, client = served
    want = Session(exports.swap, providers="cpu").encode([TEXTS[0]])["sentence_embedding"][0]
    got = client.embeddings.create(input=TEXTS[0], model="clinical", encoding_format="float", user="team-a")
    np.testing.assert_array_equal(np.asarray(got.data[0].embedding, dtype=np.float32), want)


def test_refusals_reach_the_client_as_its_error_types(served):
    _, client = served
    with pytest.raises(openai.BadRequestError, match="dimensions is not supported"):
        client.embeddings.create(input=["a"], model="clinical", dimensions=8)
    with pytest.raises(openai.UnprocessableEntityError, match="input holds token ids"):
        client.embeddings.create(input=[[101, 2000]], model="clinical")


def test_api_keys_and_metrics(tmp_path_factory):
    """With --api-key, the official client needs the key (401 -> AuthenticationError without it); health checks
    stay open; GET /metrics (prometheus-client's format) counts every request by route and status."""
    from prometheus_client.parser import text_string_to_metric_families

    exports = build_exports(tmp_path_factory.mktemp("auth"), tmp_path_factory.getbasetemp() / "embdeploy-cache",
                            masked_lm=False)
    proc, port = start_server(exports.swap, tmp_path_factory.mktemp("log") / "server.log", log_level="warning",
                              api_keys=["s3cret", "other"])
    try:
        base = f"http://127.0.0.1:{port}/v1"
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
        assert len(good.embeddings.create(input=["a", "b"], model="clinical").data) == 2
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).embeddings.create(input=["a"], model="x")
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics", headers={"Authorization": "Bearer other"})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        assert resp.status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        model = ("model", exports.swap.name)  # the one model answers every name the client sends
        assert samples[("embdeploy_requests_total", (model, ("route", "/v1/embeddings"), ("status", "200")))] == 1
        assert samples[("embdeploy_requests_total", (("model", ""), ("route", "/v1/embeddings"), ("status", "401")))] == 1
        assert samples[("embdeploy_texts_total", ())] == 2
        assert samples[("embdeploy_request_seconds_count", (("route", "/v1/embeddings"),))] == 1
    finally:
        stop_server(proc)
