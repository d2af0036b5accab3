"""TrainConfig: the one object that carries train's settings from the CLI (or a caller) to the run and its checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embdeploy.errors import EmbdeployError
from embdeploy.train import TrainConfig, train
from embdeploy.train.checkpoint import latest_checkpoint, list_checkpoints, recorded_settings

pytestmark = pytest.mark.usefixtures("one_thread")

# `embdeploy train` options that name inputs and outputs, not how the rows are trained
CLI_INPUTS = {"ext_dir", "texts", "out_dir", "eval_texts", "overwrite", "base_model"}
TOKENS = ["hyperkalemia", "troponin", "zorblax", "qwertyx"]


def texts():
    return [f"{frame} {t} today" for t in TOKENS for frame in ("we saw", "the report named", "nobody expected")]


def cli_train_params():
    import typer.main

    from embdeploy.cli import app

    return {p.name: p for p in typer.main.get_command(app).commands["train"].params}


def test_defaults_are_the_cli_defaults():
    params = cli_train_params()
    settings = {f.name: f for f in dataclasses.fields(TrainConfig)}
    # every CLI option that is not an input or output is a TrainConfig field ...
    assert set(params) - CLI_INPUTS <= set(settings)
    # ... and defaults to what TrainConfig() holds
    config = TrainConfig()
    for name in set(params) - CLI_INPUTS:
        cli_default = params[name].default
        assert getattr(cli_default, "value", cli_default) == getattr(config, name), name


def test_problems_are_collected_and_raised_at_once():
    with pytest.raises(EmbdeployError) as e:
        TrainConfig(objective="nope", steps=0, lr=-1, batch_size=0, loss="l1", checkpoint_every=5, resume=True,
                    max_contexts_per_token=0)
    msg = str(e.value)
    assert msg.startswith("cannot train:")
    for part in ("unknown objective 'nope'", "steps must be a positive integer, got 0",
                 "lr must be a positive number below 10, got -1", "batch size must be a positive integer, got 0",
                 "loss must be 'mse' or 'cos', got 'l1'", "checkpoint_every needs checkpoint_dir",
                 "resume needs checkpoint_dir", "max_contexts_per_token must be a positive integer"):
        assert part in msg, part
    assert msg.count("\n  - ") == 8
    with pytest.raises(EmbdeployError, match=r"pooled=True applies to objective 'distill' only[\s\S]*pass pooled=False"):
        TrainConfig(objective="mlm", pooled=True, layer=2)


def test_what_depends_on_the_extension_is_checked_at_once(make_extension):
    ext = make_extension("bert")  # one layer: hidden states 0..1
    with pytest.raises(EmbdeployError) as e:
        TrainConfig(layer=7, batch_size=2).resolved(ext, world=4)
    msg = str(e.value)
    assert "layer 7 does not exist: the model has hidden states 0..1" in msg
    assert "batch size 2 is smaller than the 4 processes" in msg


def test_resolved_fills_what_was_left_unset(make_extension):
    from embdeploy.train.config import DEFAULTS, default_steps

    ext = make_extension("bert")
    ext.base_info.pooling = {"mode": "mean", "normalize": True}
    got = TrainConfig().resolved(ext)
    assert (got.steps, got.lr, got.pooled) == (default_steps("distill", ext.K), DEFAULTS["distill"][1], True)
    assert TrainConfig(objective="mlm").resolved(ext).pooled is False
    given = TrainConfig(steps=5, lr=0.5, pooled=False)
    assert given.resolved(ext) == given


def test_from_dict_round_trips_and_refuses_unknown_keys(tmp_path):
    config = TrainConfig(objective="clm", steps=5, lr=0.02, batch_size=4, seed=9, device="cpu",
                         checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, resume=True)
    assert config.checkpoint_dir == str(tmp_path / "ckpt")  # a Path is kept as its string, so asdict is JSON
    back = TrainConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config))))
    assert back == config
    with pytest.raises(EmbdeployError, match=r"unknown training setting\(s\) 'warmup', 'zeta' \(TrainConfig has objective"):
        TrainConfig.from_dict({**dataclasses.asdict(config), "warmup": 0.1, "zeta": 1})
    with pytest.raises(EmbdeployError, match="must be a JSON object"):
        TrainConfig.from_dict([1, 2])


def test_train_takes_a_config_and_keyword_overrides(make_extension):
    base = TrainConfig(steps=2, batch_size=4, lr=0.05, seed=1)
    rec = train(make_extension("bert"), texts(), base, steps=3, progress=False)
    assert (rec.steps, rec.batch_size, rec.lr, rec.seed) == (3, 4, 0.05, 1)
    with pytest.raises(TypeError, match="takes a TrainConfig"):
        train(make_extension("bert"), texts(), "distill")


def test_resume_reads_back_the_config_the_run_used(make_extension, tmp_path):
    config = TrainConfig(steps=3, lr=0.05, batch_size=4, seed=2, checkpoint_dir=tmp_path, checkpoint_every=1)
    ext = make_extension("bert")
    train(ext, texts(), config, progress=False)
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    recorded, data = recorded_settings(state, tmp_path)
    assert recorded == config.resolved(ext)
    assert data["tokens"] == ext.tokens and data["base_fingerprint"] == ext.base_fingerprint

    # resume from step 2 with other run-only settings (device, checkpoint_every): the same rows as the whole run
    shutil.rmtree(latest_checkpoint(tmp_path))
    again = make_extension("bert")
    rec = train(again, texts(), config, resume=True, device="cpu", checkpoint_every=0, progress=False)
    assert rec.resumed_from_step == 2
    assert torch.equal(again.embed_table(), ext.embed_table())


def test_resume_reads_checkpoints_written_before_train_config(make_extension, tmp_path):
    """Checkpoints of earlier versions record one flat "settings" dict of the config and the data digests."""
    config = TrainConfig(steps=3, lr=0.05, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=1)
    ext = make_extension("bert")
    train(ext, texts(), config, progress=False)
    shutil.rmtree(latest_checkpoint(tmp_path))
    cp = latest_checkpoint(tmp_path)
    state = json.loads((cp / "state.json").read_text())
    run_only = ("device", "checkpoint_dir", "checkpoint_every", "resume")
    state["settings"] = {**{k: v for k, v in state.pop("config").items() if k not in run_only}, **state.pop("data")}
    (cp / "state.json").write_text(json.dumps(state))
    again = make_extension("bert")
    rec = train(again, texts(), config, resume=True, progress=False)
    assert rec.resumed_from_step == 2
    assert torch.equal(again.embed_table(), ext.embed_table())

    shutil.rmtree(latest_checkpoint(tmp_path))  # the resumed run's own step 3
    assert latest_checkpoint(tmp_path) == cp
    state["settings"]["lr"] = 0.5
    (cp / "state.json").write_text(json.dumps(state))
    with pytest.raises(EmbdeployError, match=r"other settings[\s\S]*lr: checkpoint 0.5, now 0.05"):
        train(make_extension("bert"), texts(), config, resume=True, progress=False)


def test_resume_refuses_a_checkpoint_with_unknown_settings(make_extension, tmp_path):
    config = TrainConfig(steps=2, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=1)
    train(make_extension("bert"), texts(), config, progress=False)
    cp = latest_checkpoint(tmp_path)
    state = json.loads((cp / "state.json").read_text())
    state["config"]["warmup_fraction"] = 0.2
    (cp / "state.json").write_text(json.dumps(state))
    with pytest.raises(EmbdeployError, match=rf"checkpoint {cp} has unknown training setting\(s\) 'warmup_fraction'"
                                             r"[\s\S]*start fresh without --resume"):
        train(make_extension("bert"), texts(), config, resume=True, progress=False)


def test_cli_flags_become_the_recorded_config(tmp_path):
    """`embdeploy train` builds one TrainConfig from its flags: the checkpoint records exactly those settings."""
    from embdeploy.coverage import FAMILIES, build
    from embdeploy.extend.api import extend_cli

    model, tok = build(FAMILIES["gpt2"], seed=0)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    extend_cli(str(tmp_path / "base"), tmp_path / "tokens.txt", tmp_path / "ext", init="mean-noise")
    (tmp_path / "texts.txt").write_text("\n".join(texts()) + "\n")
    ckpt = tmp_path / "ckpt"
    args = ["train", tmp_path / "ext", "--texts", tmp_path / "texts.txt", "--out", tmp_path / "trained",
            "--objective", "clm", "--steps", "3", "--lr", "0.03", "--batch-size", "4", "--seed", "5",
            "--checkpoint-dir", ckpt, "--checkpoint-every", "2", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    p = subprocess.run([sys.executable, "-m", "embdeploy.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert [c.name for c in list_checkpoints(ckpt)] == ["step-00000002", "step-00000003"]
    state = json.loads((latest_checkpoint(ckpt) / "state.json").read_text())
    recorded, _ = recorded_settings(state, ckpt)
    assert recorded == TrainConfig(objective="clm", steps=3, lr=0.03, batch_size=4, pooled=False, seed=5,
                                   device="cpu", checkpoint_dir=str(ckpt), checkpoint_every=2)
