"""What a tenant of `embdeploy serve` costs in memory: forks over one swap Session against separate Sessions.

    python perf/bench_tenants.py                  # about a minute; writes perf/results/tenants-minilm-cpu.json

Exports (once, with the CLI, into perf/work/serve/) the packaged MiniLM with the 50 shipped terms in
swap mode, then, each in a fresh process:
  forks:    one Session, then tenants added as serve adds them (`session.fork(extension=EXT)`, each
            with its own tokenizer and (K, H) table, all on the base's one ONNX Runtime session),
            each encoding a text; resident memory after 0, 1, 2, 4, 8 and 16 tenants;
  sessions: the same number of separate `Session`s (one ONNX Runtime session each), as N
            single-vocabulary processes would hold them, here in one process.
  workers:  `embdeploy serve --workers W` (W = 1, 2, 4) after a few requests: each worker's rss,
            private (anonymous) bytes, file-backed resident bytes and pss (file pages shared by
            the workers divided among them), from /proc.
Memory is the kernel's count (embdeploy.bench.procmem): rss, and private (anonymous) bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "serve"
COUNTS = (0, 1, 2, 4, 8, 16)
MB = 1 << 20


def cli(*args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", EMBDEPLOY_CACHE=str(WORK / "cache"))
    subprocess.run([sys.executable, "-m", "embdeploy.cli", *args], check=True, env=env, cwd=ROOT)


def build() -> tuple[Path, Path]:
    ext, onnx = WORK / "ext", WORK / "onnx-swap"
    if not (ext / "extension.json").is_file():
        cli("extend", "minilm", "--tokens", str(ROOT / "embdeploy" / "data" / "terms.txt"), "--out", str(ext),
            "--overwrite")
    if not (onnx / "embdeploy.json").is_file():
        cli("export", str(ext), "--mode", "swap", "--out", str(onnx), "--overwrite")
    return ext, onnx


def child(kind: str, onnx: str, ext: str) -> None:
    """In a fresh process: memory after each count of tenants (forks) or sessions."""
    sys.path.insert(0, str(ROOT))
    from embdeploy.bench.procmem import status
    from embdeploy.runtime import Session

    text = "troponin rose overnight and hyperkalemia was treated"
    base = Session(onnx, providers="cpu", threads=1)
    base.encode([text])
    held, rows = [], []
    for n in range(max(COUNTS) + 1):
        if n in COUNTS:
            gc.collect()
            rows.append({"n": n, **status()})
        s = base.fork(extension=ext) if kind == "forks" else Session(onnx, providers="cpu", threads=1, extension=ext)
        s.encode([text])
        held.append(s)
    print(json.dumps(rows))


def workers(onnx: Path, count: int) -> list[dict]:
    """Per worker of `embdeploy serve --workers count`, after 20 requests: rss, private, file, pss (bytes)."""
    import http.client
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "embdeploy.cli", "serve", str(onnx), "--port", str(port),
                             "--providers", "cpu", "--threads", "1", "--workers", str(count)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.monotonic() + 180
        while True:
            pids = [proc.pid] if count == 1 else [int(d.name) for d in Path("/proc").glob("[0-9]*")
                                                  if _ppid(d) == proc.pid and b"spawn_main" in _read(d / "cmdline")]
            if len(pids) == count and _answers(port, http.client):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"--workers {count} did not come up")
            time.sleep(0.5)
        for _ in range(20 * count):  # fresh connections: the kernel spreads them over the workers
            _answers(port, http.client)
        rows = []
        for pid in pids:
            status = dict(line.split(":", 1) for line in _read(Path(f"/proc/{pid}/status")).decode().splitlines())
            rollup = dict(line.split(":", 1) for line in _read(Path(f"/proc/{pid}/smaps_rollup")).decode().splitlines()[1:])
            kb = lambda d, k: int(d[k].split()[0]) * 1024  # noqa: E731
            rows.append({"rss": kb(status, "VmRSS"), "private": kb(status, "RssAnon"), "file": kb(status, "RssFile"),
                         "pss": kb(rollup, "Pss")})
        return rows
    finally:
        proc.terminate()
        proc.wait(60)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _ppid(d: Path) -> int:
    stat = _read(d / "stat").decode()
    return int(stat.rsplit(")", 1)[1].split()[1]) if ")" in stat else -1


def _answers(port: int, http_client) -> bool:
    try:
        conn = http_client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/embeddings", body=json.dumps({"input": "troponin rose overnight"}),
                     headers={"Content-Type": "application/json"})
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("KIND", "ONNX", "EXT"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "tenants-minilm-cpu.json")
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    ext, onnx = build()
    out = {}
    for kind in ("forks", "sessions"):
        p = subprocess.run([sys.executable, __file__, "--child", kind, str(onnx), str(ext)], capture_output=True,
                           text=True, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        rows = json.loads(p.stdout.strip().splitlines()[-1])
        first = rows[0]
        for r in rows:
            r["rss_mb"], r["private_mb"] = r["rss"] / MB, r["private"] / MB
            if r["n"]:
                r["per_extra_mb"] = {k: (r[k] - first[k]) / r["n"] / MB for k in ("rss", "private")}
        out[kind] = rows
        for r in rows:
            extra = r.get("per_extra_mb")
            print(f"{kind:8s} n={r['n']:2d}: rss {r['rss_mb']:7.1f} MB  private {r['private_mb']:7.1f} MB"
                  + (f"  per extra: rss {extra['rss']:5.2f} MB, private {extra['private']:5.2f} MB" if extra else ""))
    out["workers"] = {}
    for count in (1, 2, 4):
        rows = workers(onnx, count)
        out["workers"][str(count)] = rows
        mean = {k: sum(r[k] for r in rows) / len(rows) / MB for k in rows[0]}
        print(f"workers={count}: per worker rss {mean['rss']:.1f} MB, private {mean['private']:.1f} MB, "
              f"file {mean['file']:.1f} MB, pss {mean['pss']:.1f} MB")
    meta = json.loads((ext / "extension.json").read_text())
    result = {"what": "resident memory of N tenants: Session.fork over one swap Session vs N separate Sessions",
              "model": "packaged all-MiniLM-L6-v2, swap export", "K": meta.get("K") or len(meta.get("tokens", [])),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, **out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
