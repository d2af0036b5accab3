"""serve on a genai export: POST /v1/completions through the official `openai` client, a real server on loopback.

A tiny random Llama (untied head) with two extensions of the same base, each with a row arranged so that
its new token is the greedy next token after PROMPT (different tokens): the swap export carries the first,
the second is served as tenant "other". Greedy completions must be transformers' `generate` token for
token, decoded; the tenant's must be its own table's, new token included.
"""

from __future__ import annotations

import pytest
from test_genai import PROMPT, _arrange, _torch_greedy
from test_serve import call, start_server, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the genai extra)")

N = 6


@pytest.fixture(scope="module")
def exts(make_extension, tmp_path_factory):
    """(own, other): extensions of one base, saved; own's last row and other's first row arranged after PROMPT."""
    d = tmp_path_factory.mktemp("completions-ext")
    own, other = make_extension("llama"), make_extension("llama")
    prompt = own.tokenizer(PROMPT)["input_ids"]
    _arrange(own, prompt, own.K - 1)
    _arrange(other, prompt, 0)
    own.save(d / "own")
    other.save(d / "other")
    return own, other, d


@pytest.fixture(scope="module")
def served(exts, export_cache, tmp_path_factory):
    from embdeploy.export.genai import export_genai

    own, other, d = exts
    swap = export_genai(own, "swap", d / "swap", cache_dir=export_cache)
    log = tmp_path_factory.mktemp("completions-log") / "server.log"
    proc, port = start_server(swap.out, log, log_level="warning", tenants={"other": str(d / "other")})
    try:
        yield port, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-checked", max_retries=0)
    finally:
        stop_server(proc)


def _want(ext, n=N):
    ids = _torch_greedy(ext, ext.tokenizer(PROMPT)["input_ids"], n)
    return ids, ext.tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_completion_is_transformers_generate_and_model_picks_the_tenant(served, exts):
    port, client = served
    own, other, _ = exts
    for model, ext in (("swap", own), ("other", other)):
        ids, text = _want(ext)
        assert ids[0] == ext.V + (ext.K - 1 if ext is own else 0)  # the arranged new token comes first
        got = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
        assert got.object == "text_completion" and got.model == model
        assert got.choices[0].text == text and text.startswith(ext.tokens[ext.K - 1 if ext is own else 0])
        assert got.choices[0].finish_reason == ("stop" if ids[-1] == 0 else "length")
        assert got.usage.prompt_tokens == len(ext.tokenizer(PROMPT)["input_ids"])
        assert got.usage.completion_tokens == len(ids)
    listed = [m.id for m in client.models.list().data]
    assert listed == ["swap", "other"]


def test_streamed_chunks_join_to_the_same_text(served, exts):
    _, client = served
    own, _, _ = exts
    ids, text = _want(own)
    chunks = list(client.completions.create(model="swap", prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) >= 2  # text arrives in pieces
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop" if ids[-1] == 0 else "length"]
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_several_prompts_stop_strings_and_seeded_sampling(served, exts):
    _, client = served
    own, _, _ = exts
    _, text = _want(own)
    got = client.completions.create(model="swap", prompt=[PROMPT, PROMPT], max_tokens=N, temperature=0)
    assert [c.index for c in got.choices] == [0, 1] and {c.text for c in got.choices} == {text}
    stop = text[len(own.tokens[-1]):][:3]  # right after the new token
    assert stop.strip()
    cut = client.completions.create(model="swap", prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="swap", prompt=PROMPT, max_tokens=N, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    sampled = [client.completions.create(model="swap", prompt=PROMPT, max_tokens=N, temperature=1.0, seed=seed)
               .choices[0].text for seed in (7, 7)]
    assert sampled[0] == sampled[1]


def test_refusals_reach_the_client_as_its_error_types(served):
    port, client = served
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        client.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match=r"not supported by this server: n=2"):
        client.completions.create(model="swap", prompt=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError, match="over the model's context of 128 tokens"):
        client.completions.create(model="swap", prompt=PROMPT, max_tokens=500)
    with pytest.raises(openai.UnprocessableEntityError, match="prompt holds token ids"):
        client.completions.create(model="swap", prompt=[1, 2, 3])
    status, body = call(port, "POST", "/v1/embeddings", {"input": "a", "model": "swap"})
    assert status == 404 and "POST /v1/completions" in body["error"]["message"]
    status, body = call(port, "POST", "/v1/completions", {"model": "swap", "prompt": "a", "temperature": 3})
    assert status == 422 and "temperature must be a number in [0, 2]" in body["error"]["message"]


def test_metrics_count_generated_tokens(served, exts):
    from prometheus_client.parser import text_string_to_metric_families
    import http.client

    port, client = served
    ids, _ = _want(exts[0], 3)
    before = _generated(port, text_string_to_metric_families, http.client)
    client.completions.create(model="swap", prompt=PROMPT, max_tokens=3, temperature=0)
    assert _generated(port, text_string_to_metric_families, http.client) - before == len(ids)


def _generated(port, parse, http_client) -> float:
    conn = http_client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(s.value for f in parse(text) if f.name == "embdeploy_generated_tokens" for s in f.samples
               if s.name.endswith("_total") and s.labels.get("model") == "swap")


def test_merged_export_answers_any_model_name(exts, export_cache, tmp_path):
    from embdeploy.export.genai import export_genai

    own, _, d = exts
    merged = export_genai(own, "merged", tmp_path / "merged", cache_dir=export_cache)
    proc, port = start_server(merged.out, tmp_path / "server.log", log_level="warning")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        got = client.completions.create(model="anything", prompt=PROMPT, max_tokens=N, temperature=0)
        assert got.choices[0].text == _want(own)[1] and got.model == "anything"
    finally:
        stop_server(proc)


def test_options_for_onnx_sessions_are_refused_at_once(served, exts):
    from embdeploy.errors import EmbdeployError
    from embdeploy.runtime.completions import genai_app

    d = exts[2]
    with pytest.raises(EmbdeployError, match=r"(?s)drop --threads.*--admin-key: the admin routes serve ONNX exports"):
        genai_app(d / "swap", threads=2, admin_keys=["k"])
