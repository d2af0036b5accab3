"""`serve --workers N`: N processes on one port, each its own Session; metrics summed; SIGTERM drains all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_runtime import TEXTS, build_exports
from test_serve import start_server, stop_server
from test_serve_batching import TOL, hammer, metric_samples, wait_for

from embdeploy.errors import EmbdeployError
from embdeploy.runtime import Session

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return build_exports(tmp_path_factory.mktemp("workers"), tmp_path_factory.getbasetemp() / "embdeploy-cache",
                         masked_lm=False)


def worker_pids(parent: int) -> list[int]:
    """The parent's server processes (multiprocessing's resource tracker is not one)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the worker processes")
def test_two_workers_answer_count_together_and_drain_on_sigterm(exports, tmp_path):
    log = tmp_path / "server.log"
    proc, port = start_server(exports.swap, log, log_level="warning", workers=2, tenants={"b": str(exports.dir_b)})
    try:
        wait_for(lambda: len(worker_pids(proc.pid)) == 2, "two worker processes")
        own = {None: Session(exports.swap, providers="cpu"),
               "b": Session(exports.swap, providers="cpu", extension=exports.dir_b)}
        jobs = [("/v1/encode", {"texts": [t]} | ({"model": m} if m else {})) for t in TEXTS for m in own] * 2
        answers = hammer(port, jobs, threads=4)
        for i, (_, body) in enumerate(jobs):
            status, got = answers[i]
            assert status == 200, got
            np.testing.assert_allclose(np.asarray(got["data"], np.float32),
                                       own[body.get("model")].encode(body["texts"])["sentence_embedding"],
                                       atol=TOL.atol, rtol=TOL.rtol)

        def counted():
            return sum(v for (name, labels), v in metric_samples(port).items()
                       if name == "embdeploy_requests_total" and ("route", "/v1/encode") in labels)

        wait_for(lambda: counted() == len(jobs), f"{len(jobs)} requests counted over both workers")
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        assert worker_pids(proc.pid) == []
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_admin_routes_need_one_worker(exports):
    from embdeploy.runtime.serve import serve

    with pytest.raises(EmbdeployError, match=r"the admin routes need a single worker \(got workers=2\)"):
        serve(exports.swap, workers=2, admin_keys=["k"])
    with pytest.raises(EmbdeployError, match="workers must be a positive integer, got 0"):
        serve(exports.swap, workers=0)


def test_a_worker_that_cannot_start_stops_the_server_with_its_reason(exports):
    p = subprocess.run([sys.executable, "-m", "embdeploy.cli", "serve", str(exports.swap), "--providers", "cpu",
                        "--port", "0", "--workers", "2", "--tenant", f"x={exports.dir_foreign}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    text = " ".join((p.stdout + p.stderr).split())
    assert "tenant 'x'" in text and "fingerprint" in text
    assert "exited with status 2 (its error is above); the other workers were stopped" in text
