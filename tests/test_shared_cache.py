"""One base export cache: the quickstart and `embdeploy export` use the same location by default.

The quickstart runs in-process on a tiny random GPT-2 (its own terms and texts, 2 training steps,
3 bench rounds); the CLI export then runs as a user runs it, in a subprocess, with the same
$EMBDEPLOY_CACHE, and must find the base there instead of exporting it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

TOKENS = ["hyperkalemia", "troponin", "zorblax"]


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "base").iterdir()) if (cache / "base").is_dir() else []


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    from embdeploy.coverage import FAMILIES, build

    root = tmp_path_factory.mktemp("shared-cache")
    model, tok = build(FAMILIES["gpt2"], seed=0)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    (root / "terms.txt").write_text("\n".join(TOKENS) + "\n")
    (root / "train.txt").write_text("".join(f"the {t} result came back {w}\n" for t in TOKENS for w in ("today", "late")))
    (root / "held.txt").write_text("".join(f"a {t} test was ordered\n" for t in TOKENS) + "nothing new here\n")
    return root


def test_quickstart_and_cli_export_share_one_cache(tiny_inputs, tmp_path, monkeypatch):
    from rich.console import Console

    from embdeploy.quickstart import run_quickstart

    cache = tmp_path / "cache"
    monkeypatch.setenv("EMBDEPLOY_CACHE", str(cache))
    root, wd = tiny_inputs, tmp_path / "qs"
    console = Console(record=True, width=300)
    run_quickstart(wd, model=str(root / "base"), terms=root / "terms.txt", train_texts=root / "train.txt",
                   eval_texts=root / "held.txt", steps=2, bench_rounds=3, console=console)
    shown = " ".join(console.export_text().split())
    assert f"base export cache: {cache}" in shown
    made = entries(cache)
    assert len(made) == 1, made  # one base, exported once for the three modes
    assert not (wd / "cache").exists()
    stamp = (cache / "base" / made[0] / "model.onnx").stat().st_mtime_ns

    env = {**os.environ, "EMBDEPLOY_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    p = subprocess.run([sys.executable, "-m", "embdeploy.cli", "export", str(wd / "extension-trained"), "--mode", "swap",
                        "--out", str(tmp_path / "cli-swap")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "base from cache" in " ".join(p.stdout.split())
    assert entries(cache) == made
    assert (cache / "base" / made[0] / "model.onnx").stat().st_mtime_ns == stamp
    for export in (wd / "onnx-merged", tmp_path / "cli-swap"):
        m = json.loads((export / "embdeploy.json").read_text())
        assert Path(m["base_onnx"]).resolve() == (cache / "base" / made[0]).resolve()


def test_fresh_keeps_a_cache_that_lies_inside_the_work_directory(tmp_path):
    from embdeploy.quickstart import WORKDIR_MARK, _clear_workdir

    wd = tmp_path / "qs"
    (wd / "cache" / "base" / "entry").mkdir(parents=True)
    (wd / "cache" / "base" / "entry" / "model.onnx").write_bytes(b"onnx")
    (wd / "onnx-merged").mkdir()
    (wd / "onnx-merged" / "model.onnx").write_bytes(b"old")
    (wd / WORKDIR_MARK).write_text("made by quickstart\n")
    _clear_workdir(wd, wd / "cache")
    left = sorted(p.relative_to(wd).as_posix() for p in wd.rglob("*"))
    assert left == ["cache", "cache/base", "cache/base/entry", "cache/base/entry/model.onnx"]
