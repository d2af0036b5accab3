"""The README's promises: its set-up commands are the ones CI runs, and its Python example runs as shown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_exactly_two_setup_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(commands) == 2, commands
    install_and_run, run_tests = (c.strip() for c in commands)
    assert install_and_run.endswith("embdeploy quickstart")
    assert "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert run_tests in ci.splitlines(), "the README's test command must be the line .ci/run executes"


def test_every_cli_command_in_readme_exists():
    from embdeploy.cli import app

    registered = {c.name or c.callback.__name__ for c in app.registered_commands}
    mentioned = set(re.findall(r"`embdeploy (\w+)", README))
    assert mentioned <= registered | {"COMMAND"}, mentioned - registered


@pytest.mark.slow
def test_python_api_example_runs(tmp_path):
    code = next(b for b in _blocks("python") if "extend_model" in b)
    env = dict(os.environ, HF_HUB_OFFLINE="1", EMBDEPLOY_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(1, 384)" in p.stdout
    assert (tmp_path / "clinical-onnx" / "embdeploy.json").is_file()


@pytest.mark.slow
def test_readme_console_commands_run_as_written(tmp_path):
    """Every `$ ...` line of the README's console examples (except quickstart and serve) runs, in order, and succeeds."""
    import shutil

    lines = [ln[2:] for b in _blocks("console") for ln in b.splitlines() if ln.startswith("$ ")]
    commands = [c for c in lines if not c.startswith(("embdeploy quickstart", "embdeploy serve"))]
    assert any(c.startswith("embdeploy export") for c in commands) and any("--baseline" in c for c in commands)
    shutil.copytree(ROOT / "embdeploy" / "data", tmp_path / "embdeploy" / "data")
    env = dict(os.environ, HF_HUB_OFFLINE="1", EMBDEPLOY_CACHE=str(tmp_path / "cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for cmd in commands:
        cmd = cmd.split("   #", 1)[0]
        p = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        if cmd.startswith(("embdeploy export", "embdeploy train")):  # each says what it wrote once (issue 17)
            assert (p.stdout + p.stderr).count("wrote ") == 1, p.stdout + p.stderr
        if "--eval-texts" in cmd:  # and train prints the held-out report its help promises
            shown = " ".join(p.stdout.split())
            assert "held-out quality, before → after training" in shown and "sentence cosine, mean" in shown
    assert (tmp_path / "bench.png").is_file() and (tmp_path / "baseline.json").is_file()
