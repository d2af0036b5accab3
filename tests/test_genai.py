"""export --format genai, its gate, and generation: real model builder, real onnxruntime-genai, tiny random decoders.

Two families: a Llama with a tied head and a Qwen2 with an untied one, built from configs here
(transformers writes them to a temp dir, the builder reads that). Rows are arranged so that a new
token is the greedy next token after a prompt, so emitting new ids is shown, not assumed.
"""

from __future__ import annotations

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the genai extra)")

from conftest import NEW_TOKENS, make_bpe_tokenizer  # noqa: E402

PROMPT = "the patient had a fever"


def _model(family: str, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common)).eval()


def _arrange(ext, prompt_ids: list[int], j: int) -> None:
    """Make new id V+j the greedy next token after `prompt_ids`: its head row points along the head's input."""
    import torch

    seen = {}
    hook = ext.model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.update(h=a[0][0, -1]))
    with torch.no_grad():
        logits = ext.model(input_ids=torch.tensor([prompt_ids])).logits[0, -1]
    hook.remove()
    h = seen["h"]
    target = float(logits.max()) + 5.0
    tables = ext.head_tables if ext.head_mode == "untied" else ext.embed_tables
    rows = next(iter(tables.values()))
    rows.data[j] = h * (target / float(h @ h))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arranged(request, tmp_path_factory, export_cache):
    """(ext, prompt ids, the arranged new id, merged export, swap export) for one family."""
    from embdeploy.export.genai import export_genai
    from embdeploy.extend.model import extend_model

    tok = make_bpe_tokenizer()
    ext = extend_model(_model(request.param, len(tok)), tok, NEW_TOKENS, init="normal", seed=0)
    prompt = ext.tokenizer(PROMPT)["input_ids"]
    j = ext.K - 1
    _arrange(ext, prompt, j)
    d = tmp_path_factory.mktemp(f"genai-{request.param}")
    merged = export_genai(ext, "merged", d / "merged", cache_dir=export_cache)
    swap = export_genai(ext, "swap", d / "swap", cache_dir=export_cache)
    return ext, prompt, ext.V + j, merged, swap


def _torch_greedy(ext, ids, n):
    import torch

    with torch.no_grad():
        out = ext.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=0,
                                 pad_token_id=0, top_k=None, top_p=None, temperature=None)
    return out[0, len(ids):].tolist()


def test_both_modes_pass_the_gate_and_record_what_genai_reads(arranged):
    import json

    from embdeploy.export.manifest import ExportManifest

    ext, _, _, merged, swap = arranged
    assert swap.base_cached and merged.base_onnx == swap.base_onnx  # the builder ran once for both
    for res in (merged, swap):
        assert res.report.passed and res.report.new_ids_checked == ext.K
        m = ExportManifest.verify(res.out)
        assert m.format == "genai" and m.validation["passed"]
        cfg = json.loads((res.out / "genai_config.json").read_text())
        assert cfg["model"]["vocab_size"] == ext.V + ext.K
        assert cfg["model"]["eos_token_id"] == ext.model.config.eos_token_id
        probes = {c.probe.split(":")[0] for c in res.report.checks}
        assert {"prefill", "decode step"} <= probes
    assert any(c.probe.startswith("swapped table") for c in swap.report.checks)
    assert swap.manifest.ext_embed in swap.manifest.inputs  # fed per generator, not an initializer


def test_genai_generation_emits_the_new_token_exactly_as_transformers(arranged):
    from embdeploy.runtime.generate import Generator

    ext, prompt, new_id, merged, swap = arranged
    want = _torch_greedy(ext, prompt, 6)
    assert want[0] == new_id  # the arrangement worked in PyTorch
    for res in (merged, swap):
        gen = Generator(res.out)
        assert gen.encode(PROMPT) == prompt
        assert list(gen.generate_ids(prompt, 6)) == want
        text = "".join(gen.stream(PROMPT, 6))
        assert text == ext.tokenizer.decode(want, skip_special_tokens=True)
    notes = " ".join(merged.report.notes)
    assert "next token new" in notes  # the gate found the arranged prompt by itself


def test_swap_table_per_request_changes_generation_as_pytorch_does(arranged):
    from embdeploy.export.validate import _extension_rows
    from embdeploy.runtime.generate import Generator

    ext, prompt, new_id, _, swap = arranged
    gen = Generator(swap.out)
    m = gen.manifest
    rng = np.random.default_rng(3)
    embed = ext.embed_table().numpy()[::-1].copy()
    head = ext.head_table().numpy()[::-1].copy() if m.ext_head else None
    embed += rng.normal(0, 0.02, embed.shape).astype(np.float32)
    tables = {m.ext_embed: embed, **({m.ext_head: head} if head is not None else {})}
    got = list(gen.generate_ids(prompt, 6, extension=tables))
    with _extension_rows(ext, embed, head):
        want = _torch_greedy(ext, prompt, 6)
    assert got == want
    assert got != list(gen.generate_ids(prompt, 6))  # another table, another generation
    assert want[0] != new_id  # the arranged row moved: the reversed table puts another row at j


def test_genai_tokenizer_gives_transformers_ids_where_it_implements_the_flags(arranged):
    ext, _, _, merged, _ = arranged
    tok = og.Tokenizer(og.Model(str(merged.out)))
    texts = [",".join(NEW_TOKENS), NEW_TOKENS[0], f"{NEW_TOKENS[1]}.{NEW_TOKENS[2]}"]  # no whitespace before a new token
    for text in texts:
        assert [int(i) for i in tok.encode(text)] == ext.tokenizer(text)["input_ids"], text
        ids = ext.tokenizer(text)["input_ids"]
        assert tok.decode(np.asarray(ids, dtype=np.int32)) == ext.tokenizer.decode(ids)


def test_failed_gate_leaves_no_output(arranged, tmp_path, export_cache, monkeypatch):
    from embdeploy.errors import ValidationFailed
    from embdeploy.export import validate_genai as vg
    from embdeploy.export.genai import export_genai

    ext = arranged[0]
    real = vg.genai_generate
    monkeypatch.setattr(vg, "genai_generate", lambda *a, **k: [t + 1 for t in real(*a, **k)])  # injected fault
    with pytest.raises(ValidationFailed, match="onnxruntime-genai generated"):
        export_genai(ext, "merged", tmp_path / "out", cache_dir=export_cache)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_generate_streams_and_refuses_what_it_cannot_run(arranged, tmp_path):
    from typer.testing import CliRunner

    from embdeploy.cli import app

    ext, prompt, _, merged, swap = arranged
    runner = CliRunner()
    r = runner.invoke(app, ["generate", str(merged.out), "--prompt", PROMPT, "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    assert r.output.rstrip("\n") == ext.tokenizer.decode(_torch_greedy(ext, prompt, 6), skip_special_tokens=True)
    r = runner.invoke(app, ["generate", str(merged.out), "--prompt", PROMPT, "--extension", str(tmp_path)])
    assert r.exit_code == 2 and "--extension needs a swap export" in r.output
    r = runner.invoke(app, ["export", str(tmp_path), "--format", "genai", "--mode", "split", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "merged or swap" in r.output
