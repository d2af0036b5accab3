"""`embdeploy serve --workers N`: N server processes on one listening socket.

The parent binds the socket (a taken port is still a clear error), then starts N processes
(multiprocessing "spawn": ONNX Runtime sessions are not fork-safe) that each open their own
Session and serve on the inherited socket; the kernel spreads connections over them. Each worker
holds its own ORT session: the base's external-data file is memory-mapped, so its pages are shared
between workers through the page cache, while ORT's prepacked weights and arena are per worker
(perf/README.md has the measured resident memory per worker).

Metrics are aggregated over the workers with prometheus-client's multiprocess mode (a directory
of per-process files the parent creates and removes): GET /metrics on any worker shows every
worker's requests. The admin routes are refused with more than one worker: a tenant added
through one worker would exist in that worker only.

SIGTERM (or SIGINT) to the parent is passed to every worker as SIGTERM: each drains its requests
and exits 0, then the parent returns. A worker that exits by itself stops the others, and the
parent raises with its exit status.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading

from ..errors import EmbdeployError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def run_workers(workers: int, sock, options: dict) -> None:
    """Serve `options` (serve()'s arguments) from `workers` processes on the bound socket `sock`."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    metrics_dir = tempfile.mkdtemp(prefix="embdeploy-metrics-")
    stopping = threading.Event()
    procs = []
    try:
        with _forward_stop_signals(stopping, procs):
            for i in range(workers):
                p = ctx.Process(target=_worker, args=(options, sock, metrics_dir), name=f"embdeploy-worker-{i}")
                p.start()
                procs.append(p)
            failed = _supervise(procs, stopping, metrics_dir)
        if failed is not None:
            raise EmbdeployError(f"worker {failed[0]} exited with status {failed[1]} (its error is above); the "
                                 "other workers were stopped")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(procs, stopping: threading.Event, metrics_dir: str):
    """Wait until every worker has exited; (index, status) of one that exited on its own, else None."""
    from multiprocessing.connection import wait

    from prometheus_client import multiprocess

    failed, alive = None, dict(enumerate(procs))
    while alive:
        wait([p.sentinel for p in alive.values()], timeout=1.0)
        for i, p in list(alive.items()):
            if p.exitcode is None:
                continue
            del alive[i]
            multiprocess.mark_process_dead(p.pid, metrics_dir)  # its live gauges (in flight, queue) drop out
            if not stopping.is_set():
                failed = failed or (i, p.exitcode)
                stopping.set()
                for other in alive.values():
                    other.terminate()
            elif p.exitcode != 0 and failed is None:
                failed = (i, p.exitcode)
    return failed


@contextlib.contextmanager
def _forward_stop_signals(stopping: threading.Event, procs: list):
    """SIGTERM/SIGINT to the parent become SIGTERM to each worker (each drains, then exits)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        stopping.set()
        for p in procs:
            if p.is_alive():
                p.terminate()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _worker(options: dict, sock, metrics_dir: str) -> None:
    """One worker process: its own Session and app on the shared socket, metrics in `metrics_dir`."""
    import sys

    # prometheus-client picks its value store when first imported: this process has not imported it yet
    os.environ[MULTIPROC_ENV] = metrics_dir
    # A terminal's Ctrl-C reaches the parent too, which stops us with SIGTERM; uvicorn raises the signals
    # it handled again with the handler it found, and an ignored SIGINT then ends the worker cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .serve import _serve_on

    try:
        _serve_on(sock, **options)
    except EmbdeployError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


__all__ = ["run_workers"]
