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


@pytest.fixture(scope="module")
def quickstart_run(tiny_inputs, tmp_path_factory):
    """(result, printed text, work dir, cache): the quickstart with the cache left to its default ($EMBDEPLOY_CACHE)."""
    from rich.console import Console

    from embdeploy.quickstart import run_quickstart

    root, tmp = tiny_inputs, tmp_path_factory.mktemp("qs-run")
    cache, wd = tmp / "cache", tmp / "qs"
    console = Console(record=True, width=300)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBDEPLOY_CACHE", str(cache))
        res = run_quickstart(wd, model=str(root / "base"), terms=root / "terms.txt", train_texts=root / "train.txt",
                             eval_texts=root / "held.txt", steps=2, bench_rounds=3, console=console)
    return res, " ".join(console.export_text().split()), wd, cache


def test_quickstart_and_cli_export_share_one_cache(quickstart_run, tmp_path):
    _, shown, wd, cache = quickstart_run
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


def test_the_quickstart_summary_explains_itself(quickstart_run, tiny_inputs):
    """Terms defined, memory per mode as the bench measured it, the terms file named, what to run next."""
    import re

    res, shown, wd, _ = quickstart_run
    assert f"tokens added │ {len(TOKENS)}, from {tiny_inputs / 'terms.txt'}" in shown
    assert "BxS (B texts of S tokens)" in shown and "above 1 is slower than the base" in shown
    n = res.quality_after["candidates"]
    assert f"retrieval accuracy (1 of {n})" in shown and f"chance at most 1 in {n}" in shown
    sessions = {s["variant"]: s for s in json.loads((wd / "bench.json").read_text())["sessions"] if s["provider"] == "cpu"}
    for mode in ("merged", "split", "swap"):
        s = sessions[mode]
        assert re.search(rf"│ {mode} │ max abs diff .*per session private {s['private_mb']:.0f} MB, shared "
                         rf"{s['mapped_mb']:.0f} MB", shown), mode
    assert f"next: serve it: pip install 'embdeploy[serve]' && embdeploy serve {wd / 'onnx-merged'}" in shown
    assert f"embdeploy bench {wd / 'onnx-merged'} {wd / 'onnx-swap'} --texts YOUR_TEXTS.txt" in shown


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
