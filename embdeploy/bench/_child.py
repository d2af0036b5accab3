"""Memory measurements, each in a fresh process: `python -m embdeploy.bench._child {session|multi} SPEC_JSON`.

A fresh process per measurement, because ORT's arenas, the allocator's free
lists and the page tables of an earlier session would otherwise be counted
(or hidden). Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from . import procmem, sessions, tables
from .inputs import BASE_MIX, NEW_MIX, session_feed, token_ids

MB = procmem.MB


def _fell_back(sess) -> dict | None:
    """The error to report when a session asked for CUDA runs on the CPU instead; None when it is on CUDA."""
    used = sess.get_providers()
    if "CUDAExecutionProvider" in used:
        return None
    return {"error": f"onnxruntime fell back to {used}: no usable CUDA device"}


def measure_session(spec: dict) -> dict:
    """One session: creation time, peak and resident memory, GPU memory for CUDA."""
    files = tables.external_files(spec["model"])
    sessions.ort()  # imported before the baseline, so the library itself is not counted
    before = procmem.status()
    t0 = time.perf_counter()
    sess = sessions.create_session(spec["model"], spec["provider"], spec["threads"])
    create_s = time.perf_counter() - t0
    if spec["provider"] == "cuda" and (error := _fell_back(sess)):
        return error
    mix = NEW_MIX if spec["K"] > 0 else BASE_MIX
    sess.run(None, session_feed(sess, token_ids(1, 16, spec["V"], spec["K"], mix, 0.25, 0)))
    after = procmem.status()
    mapped = sum(procmem.mapped_bytes(files).values())
    return {
        "create_s": create_s,
        "peak_mb": (max(after["hwm"], after["rss"]) - before["rss"]) / MB,
        "rss_mb": (after["rss"] - before["rss"]) / MB,
        "private_mb": (after["private"] - before["private"]) / MB,
        "mapped_mb": mapped / MB,
        "gpu_mb": procmem.gpu_used_mb() if spec["provider"] == "cuda" else None,
    }


def measure_multi(spec: dict) -> dict:
    """N sessions in this process, each with a different extension.

    swap: every session maps the same base export and gets its own (K, H)
    table through SessionOptions.add_initializer. merged: every session gets
    its own (V+K, H) table the same way, which is what N tenants with N merged
    exports cost (one file per tenant, nothing shared).
    """
    model, mode, n = spec["model"], spec["mode"], spec["n"]
    V, K, H, threads, prepack = spec["V"], spec["K"], spec["H"], spec["threads"], spec["prepacking"]
    inits = tables.initializers(model)
    files = {i.file for i in inits.values() if i.file is not None}
    rng = np.random.default_rng(0)
    sessions.ort()

    if mode == "swap":
        ext = inits[spec["ext_name"]]
        base = tables.find_table(inits, V, H, exclude={ext.name})
        template = rng.standard_normal(ext.dims).astype(tables.numpy_dtype(ext))
        per_table = template.nbytes
        shared_bytes = V * H * template.itemsize
    else:
        table = tables.find_table(inits, V + K, H)
        template = rng.standard_normal(table.dims).astype(tables.numpy_dtype(table))
        per_table = template.nbytes
        shared_bytes = 0

    keep: list = []
    live = []
    before = procmem.status()
    t0 = time.perf_counter()
    shared_table = None
    if mode == "swap" and base.file is None:
        # Embedded in model.onnx: ORT would copy it into every session; hand all of them one buffer instead.
        shared_table = np.array(tables.read_table(model, base))
    ids = token_ids(1, 16, V, K, NEW_MIX, 0.25, 0)
    for i in range(n):
        own = template.copy()
        own[0, 0] += i  # a different table per session, every page written
        if mode == "swap":
            so = sessions.swap_options(ext.name, own, threads, keep, disable_prepacking=not prepack)
            if shared_table is not None:
                sessions.add_table(so, base.name, shared_table, keep)
        else:
            so = sessions.session_options(threads, disable_prepacking=not prepack)
            sessions.add_table(so, table.name, own, keep)
        del own
        sess = sessions.create_session(model, "cpu", threads, so=so)
        sess.run(None, session_feed(sess, ids))
        live.append(sess)
    create_s = time.perf_counter() - t0
    after = procmem.status()
    mapped = sum(procmem.mapped_bytes(files).values())

    if mode == "swap":
        if shared_table is not None:
            # Measured: ORT still parses the embedded bytes per session, so this saves only part of a copy.
            sharing = "one OrtValue for all sessions (table embedded in model.onnx: ORT still parses it per session)"
        elif procmem.covered(procmem.mapped_ranges(base.file), base.offset, base.offset + base.length):
            sharing = "mmap of the external data file"
        else:
            sharing = "none: ORT copied the external data into each session"
    else:
        sharing = "none: a private table per session"
    private = (after["private"] - before["private"]) / MB
    footprint = private + mapped / MB
    return {
        "create_s": create_s,
        "rss_mb": (after["rss"] - before["rss"]) / MB,
        "private_mb": private,
        "mapped_mb": mapped / MB,
        "footprint_mb": footprint,
        "tables_mb": n * per_table / MB,
        "shared_mb": shared_bytes / MB,
        "overhead_per_session_mb": (footprint - n * per_table / MB - shared_bytes / MB) / n,
        "sharing": sharing,
    }


def measure_multi_cuda(spec: dict) -> dict:
    """N tenants on one GPU, each with a different extension: device memory per tenant.

    A CUDA session copies every initializer to the device and cannot take a
    tenant's table through the session options (see ort.swap_session_options),
    so on CUDA the two ways to serve N extensions are: swap, one session whose
    extension table is fed from GPU memory with every run (each tenant's table
    bound through IO binding, as runtime.Session does), and merged, one session
    per tenant's export (a full (V+K, H) table and every other weight each).
    """
    model, mode, n = spec["model"], spec["mode"], spec["n"]
    V, K, H, threads = spec["V"], spec["K"], spec["H"], spec["threads"]
    inits = tables.initializers(model)
    rt = sessions.ort(cuda=True)
    rng = np.random.default_rng(0)
    ids = token_ids(1, 16, V, K, NEW_MIX, 0.25, 0)
    keep: list = []
    live, gpu = [], []
    before = procmem.status()
    t0 = time.perf_counter()
    if mode == "swap":
        own_info = inits[spec["ext_name"]]
        template = rng.standard_normal(own_info.dims).astype(tables.numpy_dtype(own_info))
        sess = sessions.create_session(model, "cuda", threads)
        if (error := _fell_back(sess)):
            return error
        if own_info.name not in {i.name for i in sess.get_overridable_initializers()}:
            return {"error": f"{model} does not declare its extension table {own_info.name!r} as a graph input, so "
                             "a tenant's table cannot be fed on CUDA; re-export it with `embdeploy export --mode swap`"}
        feed = session_feed(sess, ids)
        for i in range(n):
            own = template.copy()
            own.flat[0] += i  # a different table per tenant
            table = rt.OrtValue.ortvalue_from_numpy(own, "cuda", 0)
            io = sess.io_binding()
            for name, arr in feed.items():
                if name != own_info.name:
                    io.bind_cpu_input(name, arr)
            io.bind_ortvalue_input(own_info.name, table)
            for out in sess.get_outputs():
                io.bind_output(out.name, "cuda", 0)
            sess.run_with_iobinding(io)
            io.synchronize_outputs()
            keep.append((table, io))
            gpu.append(procmem.gpu_used_mb())
        live.append(sess)
        per_table, sharing = template.nbytes, "one session; each tenant's table fed from GPU memory (IO binding)"
        shared_mb = V * H * template.itemsize / MB
    else:
        info = tables.find_table(inits, V + K, H)
        per_table, sharing, shared_mb = int(np.prod(info.dims)) * np.dtype(tables.numpy_dtype(info)).itemsize, \
            "none: one session per tenant's export", 0.0
        for _ in range(n):
            sess = sessions.create_session(model, "cuda", threads)
            if (error := _fell_back(sess)):
                return error
            sess.run(None, session_feed(sess, ids))
            live.append(sess)
            gpu.append(procmem.gpu_used_mb())
    create_s = time.perf_counter() - t0
    after = procmem.status()
    known = all(g is not None for g in gpu)
    return {
        "create_s": create_s,
        "rss_mb": (after["rss"] - before["rss"]) / MB,
        "private_mb": (after["private"] - before["private"]) / MB,
        "mapped_mb": 0.0,
        "footprint_mb": (after["private"] - before["private"]) / MB,
        "tables_mb": n * per_table / MB,
        "shared_mb": shared_mb,
        "overhead_per_session_mb": 0.0,
        "sharing": sharing,
        "provider": "cuda",
        "gpu_mb": gpu[-1] if known else None,
        "gpu_per_session_mb": ((gpu[-1] - gpu[0]) / (n - 1)) if known and n > 1 else None,
    }


def main(argv: list[str]) -> int:
    command, spec = argv[0], json.loads(argv[1])
    try:
        if command == "session":
            out = measure_session(spec)
        elif spec.get("provider", "cpu") == "cuda":
            out = measure_multi_cuda(spec)
        else:
            out = measure_multi(spec)
    except Exception as e:  # reported to the parent, which raises it with context
        out = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
