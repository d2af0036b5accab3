"""Dynamic batching for `embdeploy serve`: the texts of concurrent requests in one ONNX Runtime run.

A request is tokenized once on arrival (`Session.tokenize_each`) and queued as a job. Runner
threads (never the event loop) take the oldest job's group, the queued texts of one table and one
output (so a batch never holds two tenants' texts), sort them by token count, cut them into batches
of at most `max_batch_texts` texts and `max_batch_tokens` padded tokens (texts × longest), and run
the batch that holds the oldest text: texts of similar length share a batch, little is padding, and
the oldest request always makes progress. A request whose texts land in several batches is
answered when its last text is done.

A runner that finds texts queued runs them at once unless requests are still arriving (being
tokenized: `arrival()`); then it waits for them up to `max_wait_ms` after the oldest job came in,
or until a batch is full. A lone client therefore never waits, and concurrent clients share runs.
While a run is going, new requests queue up and the next run takes them together.

Padding to a longer text changes float results slightly (attention sums over a longer row of masked
positions, in another order): a batched answer equals `Session.encode` of the request alone within
the validation tolerance, not bit for bit (perf/README.md has the measured difference). Per-token
outputs (last_hidden_state, logits) are not coalesced: their response grows with the padded length,
so each such request runs alone, in order, in runs of `max_batch_texts` texts, which is exactly what
`Session.encode` computes. So does every request with batching off (`enabled=False`).

The queue is bounded (`max_queue` texts waiting); `submit` refuses more with `QueueFull` (the server
answers 503 with Retry-After). A request not answered within `request_timeout` seconds is withdrawn
(`RequestTimedOut`). `close()` lets the runners finish every queued job, then stops them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import EmbdeployError

MAX_BATCH_TEXTS = 32
MAX_BATCH_TOKENS = 8192  # 32 texts of 256 tokens, MiniLM's length limit
MAX_WAIT_MS = 2.0
MAX_QUEUE = 1024  # texts
REQUEST_TIMEOUT = 30.0  # seconds


@dataclass(frozen=True)
class BatchConfig:
    """How the server forms ONNX Runtime runs from requests; see the module docstring."""

    enabled: bool = True
    max_batch_texts: int = MAX_BATCH_TEXTS
    max_batch_tokens: int = MAX_BATCH_TOKENS
    max_wait_ms: float = MAX_WAIT_MS
    max_queue: int = MAX_QUEUE
    request_timeout: float = REQUEST_TIMEOUT
    runners: int = 1  # threads running the model; ORT already spreads one run over the cores

    def __post_init__(self):
        problems = []
        for name in ("max_batch_texts", "max_batch_tokens", "max_queue", "runners"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name, low in (("max_wait_ms", 0), ("request_timeout", 1e-9)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf:
                problems.append(f"{name} must be a {'non-negative' if low == 0 else 'positive'} number, got {value!r}")
        if not isinstance(self.enabled, bool):
            problems.append(f"enabled must be true or false, got {self.enabled!r}")
        if problems:
            raise EmbdeployError("; ".join(problems))


class QueueFull(Exception):
    """The queue holds `max_queue` texts; `retry_after` is seconds until it has likely drained."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimedOut(Exception):
    """A request was not answered within `request_timeout`; `running` says whether its texts had reached a run."""

    def __init__(self, message: str, running: bool):
        super().__init__(message)
        self.running = running


class _Job:
    __slots__ = ("session", "key", "rows", "output", "solo", "future", "arrived", "waiting", "left", "values",
                 "started", "failed")

    def __init__(self, session, key, rows, output, solo):
        self.session, self.key, self.rows, self.output, self.solo = session, key, rows, output, solo
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.arrived = time.monotonic()
        self.waiting = list(range(len(rows)))  # indices not yet taken into a run
        self.left = len(rows)  # texts not yet done
        self.values = None
        self.started = False
        self.failed = False


class _Arrival:
    """A request on its way to the queue (being read or tokenized): runners may wait for it."""

    def __init__(self):
        self.open = True


class Batcher:
    """Queues tokenized requests and runs them in batches in runner threads; see the module docstring.

    `inputs`: the roles the graph takes (Session.metadata()["inputs"]); `metrics`: an object with
    `batch(texts, requests, tokens, padded)` and `queued(texts)`, or None.
    """

    def __init__(self, config: BatchConfig, inputs, metrics=None):
        self.config = config
        self.inputs = tuple(inputs)
        self.metrics = metrics
        self._cond = threading.Condition()
        self._jobs: list[_Job] = []  # FIFO of jobs with texts not yet taken
        self._queued = 0  # texts in self._jobs not yet taken
        self._arriving = 0
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._seconds_per_text = 0.0  # moving average, for Retry-After

    # ------------------------------------------------------------------ the request side
    @contextlib.contextmanager
    def arrival(self):
        """`with batcher.arrival() as a: ...; await batcher.submit(..., arrival=a)` while a request is prepared."""
        token = _Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield token
        finally:
            self._leave(token)

    def _leave(self, token) -> None:
        with self._cond:  # a re-entrant lock: submit calls this holding it
            if token is not None and token.open:
                token.open = False
                self._arriving -= 1
                self._cond.notify_all()

    def check_room(self, texts: int) -> None:
        """Raise QueueFull when `texts` more would not fit the queue (before any work is spent on them)."""
        with self._cond:
            self._refuse_if_full(texts)

    def _refuse_if_full(self, texts: int) -> None:
        if self._closing:
            raise QueueFull("the server is shutting down and takes no new requests; send it to another replica",
                            retry_after=1)
        if self._queued + texts > self.config.max_queue:
            runners = self.config.runners
            retry = max(1, math.ceil(self._queued * self._seconds_per_text / runners))
            raise QueueFull(
                f"the server is busy: {self._queued} texts are queued and this request adds {texts}, the queue "
                f"holds {self.config.max_queue} (--max-queue); retry after {retry} s, or send fewer texts per "
                "request", retry_after=retry)

    async def submit(self, session, key, rows, output: str, pooled: bool, arrival=None) -> np.ndarray:
        """The `output` values of `rows` (TokenRows of `session`'s tokenizer) run on `session`'s table.

        `key` names the table (requests with equal keys may share a run; give each tenant its own).
        Pooled outputs come back (len(rows), H); per-token ones (len(rows), S, ...), padded as
        Session.encode pads them. Raises QueueFull, RequestTimedOut, or what the run raised.
        """
        if not rows:
            raise EmbdeployError("rows is empty; pass at least one TokenRow")
        solo = not (pooled and self.config.enabled)
        job = _Job(session, ("solo", object()) if solo else (key, output), rows, output, solo)
        with self._cond:
            try:
                self._refuse_if_full(len(rows))
            finally:
                self._leave(arrival)
            self._jobs.append(job)
            self._queued += len(rows)
            self._start_runners()
            self._cond.notify_all()
            self._gauge()
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)),
                                          self.config.request_timeout)
        except asyncio.TimeoutError:
            running = self._withdraw(job)
            limit = self.config.request_timeout
            if running:
                raise RequestTimedOut(f"the model did not finish this request within {limit:g} s (--request-timeout); "
                                      "send fewer or shorter texts, or raise the limit", running=True) from None
            raise RequestTimedOut(f"the request waited {limit:g} s in the queue (--request-timeout) without reaching "
                                  "the model: the server is overloaded; retry later", running=False) from None
        except asyncio.CancelledError:  # the client went away, or the server cancels its tasks
            self._withdraw(job)
            raise

    def _withdraw(self, job: _Job) -> bool:
        """Take `job`'s waiting texts out of the queue; whether some of them had been taken into a run."""
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
                self._queued -= len(job.waiting)
                job.waiting = []
                self._gauge()
            job.failed = True
            return job.started

    # ------------------------------------------------------------------ the runner side
    def _start_runners(self) -> None:
        while len(self._threads) < self.config.runners:  # on first use: an app that never serves starts none
            t = threading.Thread(target=self._runner, name=f"embdeploy-batch-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the runners; later submits are refused."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)

    def _runner(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                self._wait_for_company()
                if not self._jobs:
                    continue
                jobs, picks = self._take()
                self._gauge()
            self._run(jobs, picks)

    def _wait_for_company(self) -> None:
        """With self._cond held: while requests are arriving, wait (up to max_wait) for a batch to fill."""
        cfg = self.config
        oldest = self._jobs[0]
        if oldest.solo or self._closing:
            return
        deadline = oldest.arrived + cfg.max_wait_ms / 1000
        while self._arriving > 0 and not self._closing and self._jobs and self._jobs[0] is oldest:
            texts = sum(len(j.waiting) for j in self._jobs if j.key == oldest.key)
            if texts >= cfg.max_batch_texts:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take(self):
        """With self._cond held: the next run, as (jobs, [(job, text index), ...]), taken out of the queue."""
        cfg = self.config
        oldest = self._jobs[0]
        if oldest.solo:
            self._jobs.pop(0)
            picks = [(oldest, i) for i in oldest.waiting]
            self._queued -= len(picks)
            oldest.waiting = []
            oldest.started = True
            return [oldest], picks
        group = [j for j in self._jobs if j.key == oldest.key]
        texts = sorted(((len(j.rows[i].ids), n, j, i) for n, j in enumerate(group) for i in j.waiting),
                       key=lambda t: (t[0], t[1]))
        # Cut the length-sorted texts into runs; keep the run that holds the oldest job's first text.
        first = (oldest, oldest.waiting[0])
        run, chosen = [], None
        for length, _, job, i in texts:
            if run and (len(run) + 1 > cfg.max_batch_texts or (len(run) + 1) * length > cfg.max_batch_tokens):
                if chosen is not None:
                    break
                run = []
            run.append((job, i))
            if (job, i) == first:
                chosen = run
        order = {id(j): n for n, j in enumerate(group)}
        # In the run, texts go in request order: a request alone in its run is then the very
        # matrix Session.encode builds for it, and gets its bit-identical answer.
        picks = sorted(chosen, key=lambda p: (order[id(p[0])], p[1]))
        taken: dict[int, set] = {}
        for job, i in picks:
            taken.setdefault(id(job), set()).add(i)
        jobs = []
        for job in group:
            mine = taken.get(id(job))
            if not mine:
                continue
            jobs.append(job)
            job.started = True
            job.waiting = [i for i in job.waiting if i not in mine]
            self._queued -= len(mine)
            if not job.waiting:
                self._jobs.remove(job)
        return jobs, picks

    def _run(self, jobs: list[_Job], picks: list) -> None:
        t = time.perf_counter()
        try:
            self._compute(jobs, picks)
        except Exception as e:
            if len(jobs) == 1:
                _fail(jobs[0], e)
            else:  # one request's fault must not fail the others of its run: each again on its own
                for job in jobs:
                    try:
                        self._compute([job], [p for p in picks if p[0] is job])
                    except Exception as e2:
                        _fail(job, e2)
        elapsed = time.perf_counter() - t
        with self._cond:
            self._seconds_per_text = 0.8 * self._seconds_per_text + 0.2 * elapsed / len(picks)

    def _compute(self, jobs: list[_Job], picks: list) -> None:
        cfg = self.config
        if jobs[0].solo:
            job = jobs[0]
            rows = [job.rows[i] for _, i in picks]
            parts = []
            for start in range(0, len(rows), cfg.max_batch_texts):  # as Session.encode(batch_size=...) runs
                feeds, mask = self._feeds(job.session, rows[start:start + cfg.max_batch_texts])
                parts.append(job.session.run(feeds, outputs=[job.output])[job.output])
                self._observe(mask, 1)
            _finish(job, _merge(parts))
            return
        session, output = jobs[0].session, jobs[0].output  # jobs of one key: one table
        feeds, mask = self._feeds(session, [job.rows[i] for job, i in picks])
        values = session.run(feeds, outputs=[output])[output]
        self._observe(mask, len(jobs))
        for (job, i), row in zip(picks, values):
            if job.values is None:
                job.values = np.empty((len(job.rows),) + row.shape, dtype=row.dtype)
            job.values[i] = row
            job.left -= 1
            if job.left == 0:
                _finish(job, job.values)

    def _feeds(self, session, rows) -> tuple[dict, np.ndarray]:
        """Session.run feeds for the roles the graph takes (it derives positions from the mask), and the mask."""
        padded = session.pad(rows)
        return {role: value for role, value in padded.items() if role in self.inputs}, padded["attention_mask"]

    def _observe(self, mask: np.ndarray, requests: int) -> None:
        if self.metrics is not None:
            self.metrics.batch(mask.shape[0], requests, int(mask.sum()), int(mask.size))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queued(self._queued)


def _finish(job: _Job, values) -> None:
    if not job.failed and not job.future.done():
        job.future.set_result(values)


def _fail(job: _Job, error: Exception) -> None:
    job.failed = True
    if not job.future.done():
        job.future.set_exception(error)


def _merge(arrays) -> np.ndarray:
    """Runs of one request joined as Session.encode joins them: per-token outputs padded with zeros to the longest."""
    if len(arrays) == 1 or arrays[0].ndim < 3:
        return np.concatenate(arrays, axis=0)
    S = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, [(0, 0), (0, S - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays], axis=0)


__all__ = ["Batcher", "BatchConfig", "QueueFull", "RequestTimedOut", "MAX_BATCH_TEXTS", "MAX_BATCH_TOKENS",
           "MAX_WAIT_MS", "MAX_QUEUE", "REQUEST_TIMEOUT"]
