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


def measure_session(spec: dict) -> dict:
    """One session: creation time, peak and resident memory, GPU memory for CUDA."""
    files = tables.external_files(spec["model"])
    sessions.ort()  # imported before the baseline, so the library itself is not counted
    before = procmem.status()
    t0 = time.perf_counter()
    sess = sessions.create_session(spec["model"], spec["provider"], spec["threads"])
    create_s = time.perf_counter() - t0
    used = sess.get_providers()
    if spec["provider"] == "cuda" and "CUDAExecutionProvider" not in used:
        return {"error": f"onnxruntime fell back to {used}: no usable CUDA device"}
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
    """N CUDA sessions in this process, each with a different extension: GPU memory per session.

    The CUDA provider copies every initializer to the device, so a base table
    that N CPU sessions share through one memory map is N copies on the GPU.
    With share_base, the swap sessions get the base table as one OrtValue that
    already lives on the device (SessionOptions.add_initializer), which is the
    way to share it there; if this ORT refuses that, the row says so.
    """
    model, mode, n = spec["model"], spec["mode"], spec["n"]
    V, K, H, threads = spec["V"], spec["K"], spec["H"], spec["threads"]
    inits = tables.initializers(model)
    rt = sessions.ort(cuda=True)
    rng = np.random.default_rng(0)
    if mode == "swap":
        own_info = inits[spec["ext_name"]]
        base = tables.find_table(inits, V, H, exclude={own_info.name})
    else:
        own_info = tables.find_table(inits, V + K, H)
    dtype = tables.numpy_dtype(own_info)
    template = rng.standard_normal(own_info.dims).astype(dtype)
    keep: list = []
    shared_value, sharing = None, "none: each session copies the base table to the GPU"
    if mode == "swap" and spec.get("share_base"):
        table = np.ascontiguousarray(tables.read_table(model, base))
        shared_value = rt.OrtValue.ortvalue_from_numpy(table, "cuda", 0)
        keep.append((table, shared_value))
        sharing = "one device OrtValue for all sessions (add_initializer)"
    elif mode != "swap":
        sharing = "none: a private table per session"
    ids = token_ids(1, 16, V, K, NEW_MIX, 0.25, 0)
    live, gpu = [], []
    before = procmem.status()
    t0 = time.perf_counter()
    for i in range(n):
        own = template.copy()
        own.flat[0] += i  # a different table per session
        if mode == "swap":
            so = sessions.swap_options(own_info.name, own, threads, keep)
        else:
            so = sessions.session_options(threads)
            sessions.add_table(so, own_info.name, own, keep)
        if shared_value is not None:
            so.add_initializer(base.name, shared_value)
        sess = sessions.create_session(model, "cuda", threads, so=so)
        if "CUDAExecutionProvider" not in sess.get_providers():
            return {"error": f"onnxruntime fell back to {sess.get_providers()}: no usable CUDA device"}
        sess.run(None, session_feed(sess, ids))
        live.append(sess)
        gpu.append(procmem.gpu_used_mb())
    create_s = time.perf_counter() - t0
    after = procmem.status()
    per_table = template.nbytes
    known = all(g is not None for g in gpu)
    return {
        "create_s": create_s,
        "rss_mb": (after["rss"] - before["rss"]) / MB,
        "private_mb": (after["private"] - before["private"]) / MB,
        "mapped_mb": 0.0,
        "footprint_mb": (after["private"] - before["private"]) / MB,
        "tables_mb": n * per_table / MB,
        "shared_mb": (V * H * template.itemsize / MB) if shared_value is not None else 0.0,
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
