"""The CLI as users run it: exit codes, messages without tracebacks, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "embdeploy.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_help_lists_commands_and_defaults():
    rc, out, _ = run("--help")
    assert rc == 0
    for cmd in ("extend", "inspect", "merge"):
        assert cmd in out
    rc, out, _ = run("extend", "--help")
    assert rc == 0 and "subword-mean" in out and "--overwrite" in out


def test_extend_inspect_merge_roundtrip(tmp_path):
    toks = tmp_path / "t.txt"
    toks.write_text("hyperkalemia\ntroponin\nthe\n")
    rc, out, err = run("extend", "minilm", "--tokens", toks, "--out", tmp_path / "ext", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert [t for t, _ in res["added"]] == ["hyperkalemia", "troponin"]
    assert res["skipped"][0][0] == "the"
    rc, out, err = run("inspect", tmp_path / "ext", "--json")
    assert rc == 0, err
    m = json.loads(out)
    assert m["K"] == 2 and m["V"] == 30522
    rc, out, err = run("inspect", tmp_path / "ext")
    assert rc == 0 and "hyperkalemia=30522" in out
    # stack a second named group onto the extension directory
    (tmp_path / "t2.txt").write_text("echocardiogram\n")
    rc, out, err = run("extend", tmp_path / "ext", "--tokens", tmp_path / "t2.txt", "--name", "imaging", "--out", tmp_path / "ext2")
    assert rc == 0, err
    m = json.loads((tmp_path / "ext2" / "extension.json").read_text())
    assert [t["id"] for t in m["tokens"]] == [30522, 30523, 30524]
    rc, out, err = run("merge", tmp_path / "ext2", "--out", tmp_path / "merged")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["vocab_size"] == 30525


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (lambda d: None, ["extend", "{d}/missing-model", "--tokens", "{d}/t.txt", "--out", "{d}/o"], "does not exist"),
        (lambda d: (d / "notmodel").mkdir(), ["extend", "{d}/notmodel", "--tokens", "{d}/t.txt", "--out", "{d}/o"], "not a Hugging Face model directory"),
        (lambda d: (d / "empty.txt").write_text(""), ["extend", "minilm", "--tokens", "{d}/empty.txt", "--out", "{d}/o"], "has no tokens"),
        (lambda d: (d / "bin.txt").write_bytes(b"\x00\x01\x02"), ["extend", "minilm", "--tokens", "{d}/bin.txt", "--out", "{d}/o"], "binary"),
        (lambda d: (d / "dup.txt").write_text("troponin\ntroponin\n"), ["extend", "minilm", "--tokens", "{d}/dup.txt", "--out", "{d}/o"], "appears twice"),
        (lambda d: (d / "o").mkdir(), ["extend", "minilm", "--tokens", "{d}/t.txt", "--out", "{d}/o"], "already exists; pass --overwrite"),
        (lambda d: None, ["extend", "minilm", "--tokens", "{d}/t.txt", "--out", "{d}/o", "--init", "copy-token"], "needs init_token"),
        (lambda d: None, ["extend", "minilm", "--tokens", "{d}/t.txt", "--out", "{d}/o", "--init", "copy-token", "--init-token", "zzqqxx"], "is not a single existing token"),
        (lambda d: None, ["extend", "minilm", "--tokens", "{d}/t.txt", "--out", "{d}/o", "--init", "vectors", "--init-source", "{d}/nope.safetensors"], "does not exist"),
        (lambda d: (d / "huge.txt").write_bytes(b"a\n" * (9 * 1024 * 1024)), ["extend", "minilm", "--tokens", "{d}/huge.txt", "--out", "{d}/o"], "not a token list"),
        (lambda d: (d / "pickle.pkl").write_bytes(b"\x80\x04\x95"), ["inspect", "{d}/pickle.pkl"], "neither an extension directory"),
        (lambda d: None, ["merge", "{d}", "--out", "{d}/m"], "not an extension directory"),
    ],
)
def test_bad_input_clear_error_nothing_written(tmp_path, setup, args, message):
    (tmp_path / "t.txt").write_text("hyperkalemia\n")
    setup(tmp_path)
    before = set(tmp_path.rglob("*"))
    rc, out, err = run(*[a.format(d=tmp_path) for a in args])
    assert rc != 0
    assert "Traceback" not in err
    assert message in " ".join(err.split()), err
    after = set(tmp_path.rglob("*"))
    assert after == before, f"wrote {after - before}"


def test_readonly_output_dir(tmp_path):
    import os

    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file cannot be created by anyone
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "out"
    (tmp_path / "t.txt").write_text("hyperkalemia\n")
    rc, _, err = run("extend", "minilm", "--tokens", tmp_path / "t.txt", "--out", target)
    assert rc != 0 and "Traceback" not in err
    assert "choose a writable --out" in " ".join(err.split())


def test_every_help_shows_the_defaults_its_options_state():
    """Help strings say "[default: …]" where the default is not a plain value; rich markup used to swallow them."""
    import re

    import typer
    from typer.testing import CliRunner

    from embdeploy.cli import app

    cmd = typer.main.get_command(app)
    runner = CliRunner()
    checked = 0
    for name, sub in cmd.commands.items():
        res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert res.exit_code == 0, res.output
        shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())
        for p in sub.params:
            for stated in re.findall(r"\[default: [^\]]+\]", p.help or ""):
                assert " ".join(stated.split()) in shown, f"{name} --help hides {stated!r} of {p.name}"
                checked += 1
    assert checked >= 15


def test_version_and_inspect_loss_format():
    from typer.testing import CliRunner

    from embdeploy import __version__
    from embdeploy.cli import app
    from embdeploy.inspect import _loss

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"embdeploy {__version__}"
    assert _loss(0.03428879790008068) == "0.03429" and _loss(None) == "None"
