"""`embdeploy serve` under load, with and without dynamic batching, on loopback.

    python perf/bench_serve.py                                   # the full run (a few minutes on 2 cores)
    python perf/bench_serve.py --requests 40 --rounds 1 --clients 1,8 --out /tmp/smoke.json   # a smoke run

Builds (once, in perf/work/serve/) an extension of the packaged MiniLM with the 50 shipped clinical
terms and exports it with the CLI (`embdeploy extend`, `embdeploy export --mode merged`, which
validates it). Starts two `embdeploy serve` processes on 127.0.0.1 over that export, one with
batching (the defaults) and one with `--no-batching`, both with `--threads THREADS`. Then, for
each round, for 1, 8 and 32 concurrent clients, in a fresh random order of the two servers: every
client sends single short texts (lines of embdeploy/data/heldout.txt) to POST /v1/embeddings
(base64, the official OpenAI client's default) over its own keep-alive connection, one request
after another, until REQUESTS requests are answered. Reported per (server, clients): throughput
(requests/s), p50 and p99 latency as the client sees it, errors (must be 0); and every answer,
decoded after the timed part, against the single-request answer (`Session.encode([text])` in this
process): max abs difference and min cosine (the validation tolerance is atol 1e-4).

With --tenants N (default 4; 0 skips it), two more servers over a swap export of the same
extension, both batching: one serving it alone, one serving it under N tenant names (`--tenant
tNAME=EXT`, each its own fork, so runs are cut per tenant); their clients send `model` = a random
one of the N names. Timed in the same rounds, at the largest client count.

The goal (issue 14): at 32 clients batching gives >= 2x the throughput of one request per run at a
p99 no worse; at 1 client batching adds <= 5% to p50; mixed traffic over 4 tenants keeps the
throughput of one tenant within 10%. The ratios are per round (the servers compared are timed in
the same round), then the median over rounds. Writes JSON to perf/results/ (--out).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "serve"
HOST = "127.0.0.1"
MODES = ("batching", "no-batching")


def cli(*args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", EMBDEPLOY_CACHE=str(WORK / "cache"))
    subprocess.run([sys.executable, "-m", "embdeploy.cli", *args], check=True, env=env, cwd=ROOT)


def build(mode: str = "merged") -> Path:
    """The export of the extension in `mode`, made with the CLI (skipped when it is already there)."""
    onnx = WORK / f"onnx-{mode}"
    if (onnx / "embdeploy.json").is_file():
        return onnx
    ext = WORK / "ext"
    if not (ext / "extension.json").is_file():
        cli("extend", "minilm", "--tokens", str(ROOT / "embdeploy" / "data" / "terms.txt"), "--out", str(ext),
            "--overwrite")
    cli("export", str(ext), "--mode", mode, "--out", str(onnx), "--overwrite")
    return onnx


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(onnx: Path, mode: str, threads: int, log: Path, tenants=(), workers: int = 1):
    port = free_port()
    args = ["serve", str(onnx), "--host", HOST, "--port", str(port), "--providers", "cpu", "--threads", str(threads)]
    if mode == "no-batching":
        args.append("--no-batching")
    if workers > 1:
        args += ["--workers", str(workers)]
    for name in tenants:
        args += ["--tenant", f"{name}={WORK / 'ext'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "embdeploy.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {mode} server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the {mode} server did not come up in 120 s:\n{log.read_text()[-3000:]}")


def load(port: int, texts: list[str], clients: int, requests: int, models=("bench",)):
    """`requests` single-text requests from `clients` threads, each naming a random one of `models`:
    (seconds, latencies, [(text, status, body)])."""
    todo = iter(range(requests))
    lock = threading.Lock()
    latencies, answers = [], []
    ready = threading.Barrier(clients + 1)

    def client(seed: int):
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        rng = random.Random(seed)
        mine, lat = [], []
        ready.wait()
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                break
            text = texts[rng.randrange(len(texts))]
            body = json.dumps({"input": text, "model": models[rng.randrange(len(models))], "encoding_format": "base64"})
            t = time.perf_counter()
            try:
                conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
            except OSError as e:
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=120)
                status, raw = 0, repr(e).encode()
            lat.append(time.perf_counter() - t)
            mine.append((text, status, raw))
        conn.close()
        with lock:
            latencies.extend(lat)
            answers.extend(mine)

    pool = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    for t in pool:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - t0, latencies, answers


def check(answers, reference: dict) -> dict:
    """Errors, and the answers against the single-request ones: max abs difference, min cosine."""
    errors, worst, min_cos = [], 0.0, 1.0
    for text, status, raw in answers:
        if status != 200:
            errors.append(f"{status}: {raw[:200]!r}")
            continue
        b64 = json.loads(raw)["data"][0]["embedding"]
        got = np.frombuffer(base64.b64decode(b64), dtype="<f4").astype(np.float64)
        want = reference[text].astype(np.float64)
        worst = max(worst, float(np.abs(got - want).max()))
        min_cos = min(min_cos, float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))))
    return {"errors": len(errors), "error_examples": errors[:3], "max_abs_diff": worst, "min_cosine": min_cos}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients per configuration (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=600, help="requests per configuration and round (default 600)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each times every configuration once (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="the servers' ONNX Runtime threads (default 1)")
    ap.add_argument("--tenants", type=int, default=4, help="tenants of the mixed-tenant comparison (default 4; 0: skip)")
    ap.add_argument("--workers", type=int, default=0,
                    help="also time a batching server with this many --workers at the largest client count (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve-minilm-cpu.json")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    onnx = build()

    sys.path.insert(0, str(ROOT))
    from embdeploy.runtime import Session

    texts = [ln.strip() for ln in (ROOT / "embdeploy" / "data" / "heldout.txt").read_text().splitlines() if ln.strip()]
    session = Session(onnx, providers="cpu", threads=1)
    reference = {t: session.encode([t])["sentence_embedding"][0] for t in texts}
    del session

    servers = {mode: start(onnx, mode, args.threads, WORK / f"server-{mode}.log") for mode in MODES}
    names = [f"t{i}" for i in range(args.tenants)]
    models = {mode: ("bench",) for mode in MODES}
    if args.tenants:  # the export's own table is the extension's, so every tenant has the same reference answers
        swap = build("swap")
        servers["swap-1-tenant"] = start(swap, "batching", args.threads, WORK / "server-swap-1.log")
        servers[f"swap-{args.tenants}-tenants"] = start(swap, "batching", args.threads, WORK / "server-swap-n.log",
                                                        tenants=names)
        models["swap-1-tenant"], models[f"swap-{args.tenants}-tenants"] = ("bench",), tuple(names)
    if args.workers > 1:
        servers[f"batching-{args.workers}-workers"] = start(onnx, "batching", args.threads, WORK / "server-workers.log",
                                                            workers=args.workers)
        models[f"batching-{args.workers}-workers"] = ("bench",)
    rng = random.Random(args.seed)
    runs = []
    try:
        for mode, (_, port) in servers.items():  # warm-up: sessions, arenas, connections
            load(port, texts, 4, 40, models[mode])
        for r in range(args.rounds):
            for n in clients:
                compared = list(servers) if n == max(clients) else list(MODES)
                for mode in rng.sample(compared, len(compared)):
                    seconds, lat, answers = load(servers[mode][1], texts, n, args.requests, models[mode])
                    lat_ms = np.asarray(lat) * 1000
                    row = {"round": r, "mode": mode, "clients": n, "requests": len(answers), "seconds": seconds,
                           "throughput": len(answers) / seconds, "p50_ms": float(np.percentile(lat_ms, 50)),
                           "p99_ms": float(np.percentile(lat_ms, 99)), **check(answers, reference)}
                    runs.append(row)
                    print(f"round {r} {mode:16s} {n:3d} clients: {row['throughput']:7.1f} req/s  p50 "
                          f"{row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  errors {row['errors']}  "
                          f"max|diff| {row['max_abs_diff']:.2e}  min cos {row['min_cosine']:.7f}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)

    summary = {}
    for n in clients:
        per_round = []
        for r in range(args.rounds):
            b = next(x for x in runs if x["round"] == r and x["clients"] == n and x["mode"] == "batching")
            u = next(x for x in runs if x["round"] == r and x["clients"] == n and x["mode"] == "no-batching")
            per_round.append((b["throughput"] / u["throughput"], b["p50_ms"] / u["p50_ms"], b["p99_ms"] / u["p99_ms"]))
        t, p50, p99 = (float(np.median([x[i] for x in per_round])) for i in range(3))
        summary[str(n)] = {"throughput_ratio": t, "p50_ratio": p50, "p99_ratio": p99}
    if args.tenants:
        top = max(clients)
        ratios = []
        for r in range(args.rounds):
            one, many = (next(x for x in runs if x["round"] == r and x["clients"] == top and x["mode"] == m)
                         for m in ("swap-1-tenant", f"swap-{args.tenants}-tenants"))
            ratios.append(many["throughput"] / one["throughput"])
        summary[f"{args.tenants}_tenants_over_1_at_{top}_clients"] = {"throughput_ratio": float(np.median(ratios))}
    if args.workers > 1:
        top, label = max(clients), f"batching-{args.workers}-workers"
        ratios = [next(x for x in runs if x["round"] == r and x["clients"] == top and x["mode"] == label)["throughput"]
                  / next(x for x in runs if x["round"] == r and x["clients"] == top and x["mode"] == "no-batching")["throughput"]
                  for r in range(args.rounds)]
        summary[f"{label}_over_no_batching_at_{top}_clients"] = {"throughput_ratio": float(np.median(ratios))}
    goals = {}
    if args.tenants == 4 and 32 in clients:
        goals["4 tenants: throughput within 10% of 1"] = summary["4_tenants_over_1_at_32_clients"]["throughput_ratio"] >= 0.9
    if "32" in summary:
        goals["32 clients: throughput >= 2x"] = summary["32"]["throughput_ratio"] >= 2.0
        goals["32 clients: p99 no worse"] = summary["32"]["p99_ratio"] <= 1.0
    if "1" in summary:
        goals["1 client: p50 + <= 5%"] = summary["1"]["p50_ratio"] <= 1.05
    result = {
        "what": "embdeploy serve, POST /v1/embeddings (base64), single short texts, loopback; batching vs --no-batching",
        "model": "packaged all-MiniLM-L6-v2 + 50 terms, merged export",
        "settings": {"requests": args.requests, "rounds": args.rounds, "clients": clients, "threads": args.threads,
                     "tenants": args.tenants},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": runs,
        "batching_over_no_batching": summary,
        "goals": goals,
        "errors": sum(x["errors"] for x in runs),
        "max_abs_diff": max(x["max_abs_diff"] for x in runs),
        "min_cosine": min(x["min_cosine"] for x in runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"batching_over_no_batching": summary, "goals": goals, "errors": result["errors"],
                      "max_abs_diff": result["max_abs_diff"], "min_cosine": result["min_cosine"]}, indent=1))
    print(f"wrote {args.out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
