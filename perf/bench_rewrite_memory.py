"""Peak memory of one graph rewrite of a 256,000 x 2048 float32 table (2 GB), per mode.

    python perf/bench_rewrite_memory.py --label after     # a few minutes; needs ~12 GB free
    python perf/bench_rewrite_memory.py --label before --rewrite /tmp/old/rewrite.py

Each case runs in a fresh process: it builds a one-node graph (`emb = Gather(table, ids)`, the
table an initializer made with numpy + onnx.helper) and holds the base table as the caller of
a rewrite does, resets the kernel's resident-set high-water mark (/proc/self/clear_refs, 5),
runs one rewrite with K = 1,000 new rows, and reads the high-water mark back (VmHWM). What is
reported is that peak above the resident set just before the rewrite, in bytes and in tables:
the memory the rewrite itself needs on top of the model and the table its caller holds.

Cases: each mode with the input kept intact (the default), each mode `in_place=True` (the
input model is rewritten and returned, as `embdeploy export` calls it) where the rewrite has
that keyword, and an onnx-ir round trip (`onnx_ir.from_proto` then `to_proto`, no rewrite):
what graph plumbing over onnx-ir would cost before any pass runs. `--rewrite FILE` measures
another rewrite module (e.g. an older rewrite.py copied aside), imported by path.

Results go to perf/results/rewrite-memory.json under `--label`; other labels there are kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
V, H, K = 256_000, 2048, 1000
GB = 1 << 30
MODES = ("merged", "split", "swap")


def _rewrites(path: str | None):
    sys.path.insert(0, str(ROOT))
    if path is None:
        from embdeploy.onnx import rewrite
    else:
        spec = importlib.util.spec_from_file_location("rewrite_under_test", path)
        rewrite = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = rewrite  # its dataclasses look their module up there
        spec.loader.exec_module(rewrite)
    return {m: getattr(rewrite, f"rewrite_{m}") for m in MODES}


def child(case: str, rewrite_file: str | None, rows: int = V) -> dict:
    import gc

    sys.path.insert(0, str(ROOT))

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from embdeploy.bench.procmem import status  # VmRSS, VmHWM

    rng = np.random.default_rng(0)
    table = rng.standard_normal((rows, H), dtype=np.float32)
    ext = rng.standard_normal((K, H), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["B", "S", H])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    del graph  # make_model copied it: one copy of the table in a proto, as a loaded model has
    gc.collect()
    if case == "onnx_ir":
        import onnx_ir as ir

        def run():
            return ir.to_proto(ir.from_proto(model)), True
    else:
        mode, _, variant = case.partition(":")
        fn = _rewrites(rewrite_file)[mode]
        kwargs = {"in_place": True} if variant == "in_place" else {}

        def run():
            return fn(model, table, ext, **kwargs)

    before = status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    new, changed = run()
    after = status()
    assert changed
    out_bytes = sum(len(t.raw_data) for t in new.graph.initializer)
    return {
        "case": case,
        "table_bytes": table.nbytes,
        "rss_before": before["rss"],
        "peak": after["hwm"],
        "peak_over_before": after["hwm"] - before["rss"],
        "peak_over_before_tables": round((after["hwm"] - before["rss"]) / table.nbytes, 2),
        "rss_after": after["rss"],
        "output_initializer_bytes": out_bytes,
        "same_object": new is model,
        "process_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="key of this run in the results file (e.g. before, after)")
    p.add_argument("--rewrite", help="a rewrite module to import by path instead of embdeploy.onnx.rewrite")
    p.add_argument("--cases", nargs="*", help="default: every mode, in place where supported, and onnx_ir")
    p.add_argument("--out", type=Path, default=HERE / "results" / "rewrite-memory.json")
    p.add_argument("--min-free-gb", type=float, default=12.0,
                   help="skip a case when less memory is available (the machine is shared)")
    p.add_argument("--rows", type=int, default=V, help="table rows (a small value for a smoke run)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rewrite, args.rows)))
        return 0

    cases = args.cases
    if not cases:
        in_place = "in_place" in inspect.signature(_rewrites(args.rewrite)["merged"]).parameters
        cases = [*MODES, *(f"{m}:in_place" for m in MODES if in_place), "onnx_ir"]
    rows = []
    for case in cases:
        free = _available()
        if free < args.min_free_gb * GB:
            print(f"{case}: skipped, {free / GB:.1f} GB available", flush=True)
            rows.append({"case": case, "skipped": f"{free / GB:.1f} GB available"})
            continue
        cmd = [sys.executable, __file__, "--label", args.label, "--rows", str(args.rows), "--child", case]
        if args.rewrite:
            cmd += ["--rewrite", args.rewrite]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            rows.append({"case": case, "failed": done.stderr.strip().splitlines()[-1:]})
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{case:16s} peak above the model and table held: {row['peak_over_before'] / GB:5.2f} GB "
              f"({row['peak_over_before_tables']:.2f} tables); process peak {row['peak'] / GB:5.2f} GB", flush=True)

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["table"] = {"V": args.rows, "H": H, "K": K, "dtype": "float32", "bytes": args.rows * H * 4}
    results.setdefault("runs", {})[args.label] = {
        "rewrite": args.rewrite or "embdeploy.onnx.rewrite",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
