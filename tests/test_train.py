"""The train stage: only the K×H rows learn, the base stays bit-identical, runs are reproducible.

Tiny random models (built in conftest) for the mechanics; one slow test on the packaged MiniLM.
"""

from __future__ import annotations

import copy
import json
import os
import time

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from embdeploy.errors import EmbdeployError
from embdeploy.extend.config import ExtensionConfig
from embdeploy.extend.model import Extension, extend_model, load_extension
from embdeploy.train import read_texts, train
from embdeploy.train.align import build_examples, is_causal
from embdeploy.train.hf import lm_loss
from embdeploy.train.checkpoint import latest_checkpoint, list_checkpoints
from embdeploy.train.texts import harvest_contexts


pytestmark = pytest.mark.usefixtures("one_thread")


NEW_WP = ["hyperkalemia", "troponin", "echocardiogram"]
NEW_BPE = ["fever-scan", "troponin", "cpuwork"]
FRAMES = [
    "the patient had {t} and a fever",
    "{T} was found in the blood test",
    "the doctor asked about {t} again",
    "results showed {t} on the second day",
    "we talked about {t} with the family",
    "a report on {t} came back normal",
]


def corpus(tokens):
    return [f.replace("{t}", t).replace("{T}", t[:1].upper() + t[1:]) for t in tokens for f in FRAMES]


def make_ext(arch, wordpiece_tokenizer, bpe_tokenizer, tokens=None, **cfg):
    if arch in ("bert", "bert-mlm"):
        model = tiny_bert(masked_lm=arch == "bert-mlm")
        tok = copy.deepcopy(wordpiece_tokenizer)
        tokens = tokens or NEW_WP
    else:
        tok = copy.deepcopy(bpe_tokenizer)
        model = tiny_gpt2(len(tok)) if arch == "gpt2" else tiny_llama(len(tok))
        tokens = tokens or NEW_BPE
    ext = Extension(model, tok)
    ext.add(ExtensionConfig(tokens=list(tokens), **cfg))
    return ext


def snapshot(ext):
    """Copies of every base tensor that must not move, and of the new rows."""
    base = {n: p.detach().clone() for n, p in ext.model.named_parameters() if "embdeploy_tables" not in n}
    return base, ext.embed_table().clone(), (ext.head_table().clone() if ext.head_mode == "untied" else None)


def assert_only_rows_moved(ext, snap):
    base, rows, head_rows = snap
    now = {n: p for n, p in ext.model.named_parameters() if "embdeploy_tables" not in n}
    assert now.keys() == base.keys()
    for n, p in now.items():
        assert torch.equal(p, base[n]), f"base parameter {n} changed"
    assert torch.equal(ext.base_table(), base_table_of(base, ext))
    assert not torch.equal(ext.embed_table(), rows), "new input rows did not change"
    assert (ext.embed_table() != rows).any(dim=1).all(), "some new input row did not change"
    if head_rows is not None:
        assert not torch.equal(ext.head_table(), head_rows), "new (untied) head rows did not change"
    ext.verify_base()


def base_table_of(base, ext):
    for n, p in base.items():
        if p.shape == ext.base_table().shape and p.data_ptr() != 0 and torch.equal(p, ext.base_table()):
            return p
    raise AssertionError("base table not among the snapshot")


def rows(ext):
    out = [ext.embed_table().clone()]
    if ext.head_mode == "untied":
        out.append(ext.head_table().clone())
    return out


CASES = [
    ("bert", "distill", {}),
    ("bert", "distill", {"pooled": True, "loss": "cos"}),
    ("bert", "distill", {"layer": 1}),
    ("bert-mlm", "mlm", {}),
    ("bert-mlm", "distill", {}),
    ("gpt2", "clm", {}),
    ("gpt2", "distill", {}),
    ("llama", "clm", {}),
    ("llama", "distill", {}),
]


@pytest.mark.parametrize("arch,objective,kw", CASES, ids=[f"{a}-{o}-{'-'.join(k)}" for a, o, k in CASES])
def test_only_new_rows_learn(arch, objective, kw, wordpiece_tokenizer, bpe_tokenizer, monkeypatch):
    ext = make_ext(arch, wordpiece_tokenizer, bpe_tokenizer)
    tokens = ext.tokens
    snap = snapshot(ext)
    # exactly the K×H tables require grad ...
    trainable = {n: p for n, p in ext.model.named_parameters() if p.requires_grad}
    assert trainable and all("embdeploy_tables" in n for n in trainable)
    # ... and exactly those the objective needs are handed to the optimizer
    seen = []
    real = torch.optim.AdamW

    def spy(params, **okw):
        params = list(params)
        seen.extend(params)
        assert okw.get("weight_decay") == 0.0
        return real(params, **okw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    rec = train(ext, corpus(tokens), objective=objective, steps=8, lr=5e-2, batch_size=4, progress=False, **kw)
    K, H = ext.K, ext.H
    want = list(ext.embed_tables.values())
    if objective != "distill" and ext.head_mode == "untied":
        want += list(ext.head_tables.values())
    assert [id(p) for p in seen] == [id(p) for p in want]
    assert sum(p.numel() for p in seen) == K * H * (2 if len(want) == 2 else 1)
    if objective == "distill":
        snap = (snap[0], snap[1], None)  # distillation does not use the head
    assert_only_rows_moved(ext, snap)
    assert rec.objective == objective and rec.steps == 8 and rec.first_loss > 0
    assert rec.data_sha256.startswith("sha256:") and rec.tokens_without_context == []
    assert ext.training_records[-1] == rec.to_json()
    json.dumps(rec.to_json())


def test_distill_loss_falls(wordpiece_tokenizer, bpe_tokenizer):
    from embdeploy.train.objectives import make_objective, pad_id

    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer)
    ctx = harvest_contexts(ext, corpus(NEW_WP))
    examples = build_examples(ext, ctx.texts, causal=False)
    obj = make_objective("distill", ext, examples, False, pad_id(ext.tokenizer))
    obj.setup()
    everything = list(range(len(examples)))

    def full_loss():
        with torch.no_grad():
            return float(obj.loss(obj.module(), everything, 0, 0, 1 / len(everything))[0])

    before = full_loss()
    train(ext, corpus(NEW_WP), steps=40, lr=2e-2, batch_size=8, progress=False)
    # one row cannot reproduce several pieces exactly (the floor is not 0), and most positions are unchanged ones
    assert full_loss() < 0.95 * before  # a tiny random model: the floor is near 0.93 of the start


def test_pooled_is_the_default_for_sentence_embedding_models(wordpiece_tokenizer, bpe_tokenizer):
    from rich.console import Console

    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer)
    assert train(ext, corpus(NEW_WP), steps=2, batch_size=4, progress=False).pooled is False
    ext.base_info.pooling = {"mode": "mean", "normalize": True}
    console = Console(record=True, width=120, force_terminal=False)
    rec = train(ext, corpus(NEW_WP), steps=2, batch_size=4, console=console)
    assert rec.pooled is True
    shown = console.export_text()
    assert "2/2" in shown and "loss" in shown and "tok/s" in shown  # the progress line
    with pytest.raises(EmbdeployError, match="pooled=True matches the pooled output"):
        train(ext, corpus(NEW_WP), steps=2, layer=1, pooled=True, progress=False)


def test_identical_runs_give_identical_rows(wordpiece_tokenizer, bpe_tokenizer):
    got = []
    for _ in range(2):
        ext = make_ext("llama", wordpiece_tokenizer, bpe_tokenizer)
        train(ext, corpus(NEW_BPE), objective="clm", steps=5, batch_size=4, seed=3, progress=False)
        got.append(rows(ext))
    assert all(torch.equal(a, b) for a, b in zip(*got))
    ext = make_ext("llama", wordpiece_tokenizer, bpe_tokenizer)
    train(ext, corpus(NEW_BPE), objective="clm", steps=5, batch_size=4, seed=4, progress=False)
    assert not torch.equal(rows(ext)[0], got[0][0])


@pytest.mark.parametrize("arch,objective", [("bert", "distill"), ("llama", "clm"), ("bert-mlm", "mlm")])
def test_resume_equals_uninterrupted(arch, objective, wordpiece_tokenizer, bpe_tokenizer, tmp_path, monkeypatch):
    import embdeploy.train.loop as loop

    tokens = NEW_WP if arch.startswith("bert") else NEW_BPE
    kw = dict(objective=objective, steps=7, lr=3e-2, batch_size=4, progress=False)
    full = make_ext(arch, wordpiece_tokenizer, bpe_tokenizer)
    train(full, corpus(tokens), **kw)

    ext = make_ext(arch, wordpiece_tokenizer, bpe_tokenizer)
    real_batch = loop._Sampler.batch

    def interrupted(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(loop._Sampler, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(ext, corpus(tokens), checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    monkeypatch.setattr(loop._Sampler, "batch", real_batch)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    last = latest_checkpoint(tmp_path)
    assert sorted(f.name for f in last.iterdir()) == ["optimizer.safetensors", "state.json", "tables.safetensors"]

    again = make_ext(arch, wordpiece_tokenizer, bpe_tokenizer)  # a fresh process would reload the extension dir
    rec = train(again, corpus(tokens), checkpoint_dir=tmp_path, resume=True, **kw)
    assert rec.resumed_from_step == 4
    assert all(torch.equal(a, b) for a, b in zip(rows(full), rows(again)))
    again.verify_base()
    assert latest_checkpoint(tmp_path).name == "step-00000007"


def test_resume_refuses_other_settings(wordpiece_tokenizer, bpe_tokenizer, tmp_path):
    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer)
    train(ext, corpus(NEW_WP), steps=2, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    with pytest.raises(EmbdeployError, match=r"other settings[\s\S]*lr: checkpoint 0.01, now 0.1[\s\S]*batch_size"):
        train(ext, corpus(NEW_WP), steps=2, lr=0.1, batch_size=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(EmbdeployError, match="no checkpoint in"):
        train(ext, corpus(NEW_WP), steps=2, checkpoint_dir=tmp_path / "nothing", resume=True, progress=False)


def test_default_schedule_scales_with_k_and_says_so(wordpiece_tokenizer, bpe_tokenizer, one_thread):
    from embdeploy.train.loop import default_steps

    assert default_steps("distill", 50) == 300 and default_steps("distill", 1000) == 3000
    tokens = [f"zq{i:03d}xw" for i in range(110)]
    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer, tokens=tokens)
    rec = train(ext, [f"the {t} rose" for t in tokens], batch_size=4, progress=False)
    assert rec.steps == 330
    assert rec.notes[0].startswith("steps: 330 (the default for K=110: 3 per new token, at least 300")


def test_resume_refuses_a_changed_or_nonfinite_checkpoint(wordpiece_tokenizer, bpe_tokenizer, tmp_path):
    """A float of a checkpoint's rows set to 3.4e37 is caught by the digests; NaN is caught even when the
    digests are rewritten to match."""
    import hashlib

    from safetensors.torch import load_file, save_file

    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer)
    train(ext, corpus(NEW_WP), steps=2, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    cp = latest_checkpoint(tmp_path)
    tables = load_file(str(cp / "tables.safetensors"))
    tables["embed.default"][0, 0] = 3.4e37
    save_file(tables, str(cp / "tables.safetensors"), metadata={"format": "embdeploy-train-checkpoint"})
    again = dict(steps=4, batch_size=4, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(EmbdeployError, match="tables.safetensors changed after it was written"):
        train(ext, corpus(NEW_WP), **again)
    tables["embed.default"][0, 0] = float("nan")
    save_file(tables, str(cp / "tables.safetensors"), metadata={"format": "embdeploy-train-checkpoint"})
    state = json.loads((cp / "state.json").read_text())
    state["digests"]["tables.safetensors"] = "sha256:" + hashlib.sha256((cp / "tables.safetensors").read_bytes()).hexdigest()
    (cp / "state.json").write_text(json.dumps(state))
    with pytest.raises(EmbdeployError, match="holds NaN or Inf in embed.default"):
        train(ext, corpus(NEW_WP), **again)
    del state["digests"]
    (cp / "state.json").write_text(json.dumps(state))
    with pytest.raises(EmbdeployError, match="has no digests"):
        train(ext, corpus(NEW_WP), **again)


def test_checkpoint_survives_save_and_load(wordpiece_tokenizer, bpe_tokenizer, tmp_path):
    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer)
    ext.base_info.ref = ext.base_info.path = ""
    rec = train(ext, corpus(NEW_WP), steps=3, batch_size=4, progress=False)
    ext.save(tmp_path / "ext")
    manifest = json.loads((tmp_path / "ext" / "extension.json").read_text())
    assert manifest["training"][-1]["data_sha256"] == rec.data_sha256
    loaded = load_extension(tmp_path / "ext", model=tiny_bert())
    assert torch.equal(loaded.embed_table(), ext.embed_table())
    assert loaded.training_records == ext.training_records


def test_token_without_context_is_reported_and_trained(wordpiece_tokenizer, bpe_tokenizer):
    tokens = NEW_WP + ["bradycardia"]
    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer, tokens=tokens)
    before = ext.embed_table().clone()
    rec = train(ext, corpus(NEW_WP), steps=12, lr=5e-2, batch_size=8, progress=False)
    assert rec.tokens_without_context == ["bradycardia"]
    assert any("bradycardia" in n and "synthetic" in n for n in rec.notes)
    assert not torch.equal(ext.embed_table()[3], before[3])  # trained on synthetic contexts, not skipped


def test_harvest_case_and_word_boundary(wordpiece_tokenizer, bpe_tokenizer):
    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer)
    texts = ["TROPONIN rose", "troponins are proteins", "no new word here", "Echocardiogram and troponin today"]
    ctx = harvest_contexts(ext, texts)
    by = {t: [ctx.texts[i] for i in ix] for t, ix in ctx.by_token.items()}
    assert by["troponin"] == ["TROPONIN rose", "Echocardiogram and troponin today"]  # uncased tokenizer: any case
    assert by["echocardiogram"] == ["Echocardiogram and troponin today"]
    assert ctx.without_context == ["hyperkalemia"]
    assert "hyperkalemia" in by["hyperkalemia"][0]  # the synthetic fallback
    # a cased tokenizer (byte-level BPE) only matches the exact spelling
    bpe = make_ext("gpt2", wordpiece_tokenizer, bpe_tokenizer)
    ctx = harvest_contexts(bpe, ["Troponin rose", "the troponin rose"])
    assert [ctx.texts[i] for i in ctx.by_token["troponin"]] == ["the troponin rose"]


def test_harvest_finds_tokens_after_the_normalizer(wordpiece_tokenizer, bpe_tokenizer):
    """A token in the uncased, accent-stripped form (what `suggest` writes for BERT) finds the accented,
    capitalised spelling in the corpus, as the tokenizer itself matches it; the cap is a seeded reservoir."""
    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer, tokens=["unterstutzt", "kardiologie"])
    texts = ["Das Team Unterstützt die Studie.", "sie unterstützt uns", "Kardiologie heute", "nichts neues"]
    ctx = harvest_contexts(ext, texts)
    by = {t: [ctx.texts[i] for i in ix] for t, ix in ctx.by_token.items()}
    assert by["unterstutzt"] == ["Das Team Unterstützt die Studie.", "sie unterstützt uns"]
    assert by["kardiologie"] == ["Kardiologie heute"]
    assert ctx.without_context == []
    many = [f"{n} mal unterstützt" for n in range(200)]
    a, b = harvest_contexts(ext, many, max_per_token=8, seed=3), harvest_contexts(ext, many, max_per_token=8, seed=3)
    kept = [a.texts[i] for i in a.by_token["unterstutzt"]]
    assert len(kept) == 8 and a.texts == b.texts
    assert set(kept) <= set(many) and kept != many[:8]  # sampled from the whole corpus, not its head


def test_alignment_maps_new_token_to_its_pieces(wordpiece_tokenizer, bpe_tokenizer):
    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer)
    (ex,) = build_examples(ext, ["the troponin rose."], causal=False)
    pieces = ext.base_tokenizer.convert_ids_to_tokens(ex.teacher_ids)
    assert pieces == ["[CLS]", "the", "tr", "##op", "##oni", "##n", "rose", ".", "[SEP]"]
    got = [(c.student, c.teacher, c.new) for c in ex.components]
    assert got == [((0,), (0,), False), ((1,), (1,), False), ((2,), (2, 3, 4, 5), True),
                   ((3,), (6,), False), ((4,), (7,), False), ((5,), (8,), False)]
    # causal: positions before the new token carry no signal and are dropped
    gpt = make_ext("gpt2", wordpiece_tokenizer, bpe_tokenizer)
    assert is_causal(gpt.model) and not is_causal(ext.model)
    (ex,) = build_examples(gpt, ["the doctor saw troponin rise"], causal=True)
    assert ex.components[0].new and len(ex.components[0].teacher) > 1
    assert [len(c.student) for c in ex.components] == [1] * len(ex.components)
    assert ex.student_ids[ex.components[0].student[0]] == gpt.token_ids["troponin"]


def test_tied_head_rows_stay_within_base_norms(wordpiece_tokenizer, bpe_tokenizer):
    ext = make_ext("gpt2", wordpiece_tokenizer, bpe_tokenizer)
    assert ext.head_mode == "tied"
    train(ext, corpus(NEW_BPE), objective="clm", steps=10, lr=1.0, batch_size=4, progress=False)
    assert float(ext.embed_table().norm(dim=1).max()) <= float(ext.base_table().norm(dim=1).max()) * (1 + 1e-5)


def test_wrong_objective_and_arguments_are_explained(wordpiece_tokenizer, bpe_tokenizer):
    bert = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer)
    with pytest.raises(EmbdeployError, match="'mlm' needs a fill-mask model with an LM head"):
        train(bert, corpus(NEW_WP), objective="mlm", steps=1, progress=False)
    mlm = make_ext("bert-mlm", wordpiece_tokenizer, bpe_tokenizer)
    with pytest.raises(EmbdeployError, match="'clm' is for causal models"):
        train(mlm, corpus(NEW_WP), objective="clm", steps=1, progress=False)
    with pytest.raises(EmbdeployError) as e:
        train(bert, corpus(NEW_WP), objective="nope", steps=0, lr=-1, checkpoint_every=5, progress=False)
    msg = str(e.value)
    for part in ("unknown objective 'nope'", "steps must be a positive integer", "lr must be", "checkpoint_every needs checkpoint_dir"):
        assert part in msg
    with pytest.raises(EmbdeployError, match="layer 7 does not exist"):
        train(bert, corpus(NEW_WP), layer=7, steps=1, progress=False)


def test_read_texts_formats_and_errors(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first text\n\n  second text  \n")
    assert read_texts(plain) == ["first text", "second text"]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "one"}\n{"text": "two", "id": 3}\n')
    assert read_texts(jl) == ["one", "two"]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "one"}\n{"body": "x"}\nnot json\n')
    with pytest.raises(EmbdeployError, match=r'line 2: expected an object with a string field "text"[\s\S]*line 3: not valid JSON'):
        read_texts(bad)
    with pytest.raises(EmbdeployError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(EmbdeployError, match="is empty"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02abc")
    with pytest.raises(EmbdeployError, match="is binary"):
        read_texts(tmp_path / "bin.dat")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(EmbdeployError, match="not UTF-8"):
        read_texts(tmp_path / "latin.txt")
    with pytest.raises(EmbdeployError, match="is a directory"):
        read_texts(tmp_path)


def test_trains_inside_transformers_trainer(wordpiece_tokenizer, bpe_tokenizer, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    ext = make_ext("bert-mlm", wordpiece_tokenizer, bpe_tokenizer)
    snap = snapshot(ext)
    enc = ext.tokenizer(corpus(NEW_WP), truncation=True, max_length=32)
    data = [{"input_ids": ids} for ids in enc["input_ids"]]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(ext.tokenizer, mlm_probability=0.3)
    # The models' own losses reshape logits by config.vocab_size (= V); lm_loss uses all V+K outputs.
    trainer = Trainer(model=ext.model, args=args, train_dataset=data, data_collator=collator,
                      compute_loss_func=lm_loss(causal=False))
    trainer.train()
    ext.model.eval()
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in opt_params] == [id(p) for p in ext.extension_parameters()]
    assert_only_rows_moved(ext, snap)


def test_trains_inside_trainer_causal_untied(wordpiece_tokenizer, bpe_tokenizer, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    ext = make_ext("llama", wordpiece_tokenizer, bpe_tokenizer)
    snap = snapshot(ext)
    data = [{"input_ids": ids} for ids in ext.tokenizer(corpus(NEW_BPE))["input_ids"]]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=ext.model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(ext.tokenizer, mlm=False),
                      compute_loss_func=lm_loss(causal=True))
    trainer.train()
    ext.model.eval()
    assert_only_rows_moved(ext, snap)


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, out, wp_dir, kw):
    import torch.distributed as dist
    from transformers import AutoTokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tok = AutoTokenizer.from_pretrained(wp_dir)
        ext = extend_model(tiny_bert(), tok, NEW_WP)
        train(ext, corpus(NEW_WP), progress=False, **kw)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({"rows": ext.embed_table().contiguous()}, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(wordpiece_tokenizer, minilm_dir, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    kw = dict(objective="distill", steps=6, lr=3e-2, batch_size=8, seed=1)
    out = str(tmp_path / "ddp.safetensors")
    t0 = time.perf_counter()
    mp.spawn(_ddp_worker, args=(2, _free_port(), out, str(minilm_dir), kw), nprocs=2, join=True)
    assert time.perf_counter() - t0 < 60
    ddp_rows = load_file(out)["rows"]

    single = extend_model(tiny_bert(), copy.deepcopy(wordpiece_tokenizer), NEW_WP)
    start = single.embed_table().clone()
    train(single, corpus(NEW_WP), progress=False, **kw)
    assert not torch.equal(single.embed_table(), start)
    torch.testing.assert_close(ddp_rows, single.embed_table(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- MiniLM, end to end
@pytest.mark.slow
def test_minilm_short_training_closes_most_of_the_gap():
    """A quarter of the default compute (150 steps of 16) on the demo data; the full goal is perf/bench_train.py's."""
    from embdeploy.models import load_base
    from embdeploy.train import demo_file

    model, tok, info = load_base("minilm")
    ext = Extension(model, tok, info)
    ext.add(ExtensionConfig(tokens=read_texts(demo_file("terms.txt"))))
    rec = train(ext, demo_file("train.txt"), eval_texts=demo_file("heldout.txt"), steps=150, batch_size=16, progress=False)
    before, after = rec.eval_before, rec.eval_after
    assert rec.pooled  # MiniLM has sentence-transformers pooling
    assert after["sentence_cos_mean"] > before["sentence_cos_mean"] + 0.1
    assert after["sentence_cos_mean"] >= 0.92 and after["sentence_cos_min"] >= 0.75
    assert after["retrieval_accuracy"] >= 0.95
    ext.verify_base()


def test_model_that_needs_decoder_inputs_is_refused_clearly(bpe_tokenizer):
    import copy

    from transformers import T5Config, T5Model

    from embdeploy import extend_model
    from embdeploy.errors import EmbdeployError
    from embdeploy.train import train

    tok = copy.deepcopy(bpe_tokenizer)
    model = T5Model(T5Config(vocab_size=len(tok), d_model=32, d_ff=32, num_layers=1, num_heads=2, d_kv=16,
                             decoder_start_token_id=0, pad_token_id=0))
    ext = extend_model(model, tok, ["troponin"])
    with pytest.raises(EmbdeployError, match="T5Model cannot run on input_ids and attention_mask alone"):
        train(ext, ["the troponin rose"], steps=2, progress=False)


# --------------------------------------------------------------------------- device


def test_device_is_recorded_and_bad_devices_are_refused(wordpiece_tokenizer, bpe_tokenizer):
    ext = make_ext("bert", wordpiece_tokenizer, bpe_tokenizer)
    rec = train(ext, corpus(NEW_WP), steps=2, batch_size=4, progress=False, device="cpu")
    assert rec.device == "cpu" and ext.training_records[-1]["device"] == "cpu"
    for bad, says in (("tpu", "unknown device 'tpu'"), ("meta", "not supported"), ("cuda:7", None)):
        if bad == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(EmbdeployError, match=says or "cuda:7") as info:
            train(ext, corpus(NEW_WP), steps=2, batch_size=4, progress=False, device=bad)
        assert "cpu" in str(info.value)  # the fix: a device that works
    if not torch.cuda.is_available():
        with pytest.raises(EmbdeployError, match="sees no CUDA GPU"):
            train(ext, corpus(NEW_WP), steps=2, batch_size=4, progress=False, device="cuda")
        assert train(ext, corpus(NEW_WP), steps=1, batch_size=4, progress=False).device == "cpu"  # auto
