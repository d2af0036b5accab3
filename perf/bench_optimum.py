"""What a user would pick instead: optimum-onnx's export of the base model against embdeploy's base and its
merged/split/swap exports with K new tokens, timed interleaved in one run (`embdeploy bench`'s run_bench).

Runs in the optimum environment (transformers<4.58 with optimum-onnx; `.ci/run` builds it as .venv-optimum):

    .venv-optimum/bin/python perf/bench_optimum.py          # MiniLM, K=1000 -> perf/results/optimum-vs-embdeploy-cpu.{md,json}
    .venv-optimum/bin/python perf/bench_optimum.py --model DIR --K 8 --shapes 1x8 --rounds 3 --no-memory --out /tmp/b

What is timed (ratios are to the first; every export but the first two holds K new rows):

    base                   optimum's export, as `optimum-cli export onnx --model MODEL --task feature-extraction`
                           makes it (for a sentence-transformers model: token_embeddings + sentence_embedding)
    base:embdeploy-base    embdeploy's base export (torch.onnx dynamo; last_hidden_state [+ sentence_embedding])
    merged:embdeploy-merged, split, swap
                           `embdeploy export --mode M` of the extension (rewrites of embdeploy's base), validated
    merged:optimum-merged  `embdeploy export --mode merged --base-onnx` optimum's export, validated

Exports are built in --work and reused when complete (--rebuild to start over). Before timing,
optimum's and embdeploy's base exports are run on the same text and must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from synth_models import write_manifest  # noqa: E402

from embdeploy.bench import parse_shapes, print_result, run_bench  # noqa: E402
from embdeploy.bench.artifacts import load_artifact  # noqa: E402
from embdeploy.bench.report import markdown  # noqa: E402
from embdeploy.errors import EmbdeployError  # noqa: E402

MODES = ("merged", "split", "swap")
NAME = "optimum-vs-embdeploy-cpu"


def extension(model: str, K: int, work: Path):
    """The model extended with K synthetic tokens (random rows: timing does not depend on their values)."""
    from embdeploy.extend.config import ExtensionConfig
    from embdeploy.extend.model import Extension, load_extension
    from embdeploy.models import load_base

    ext_dir = work / "ext"
    if (ext_dir / "extension.json").is_file():
        return load_extension(ext_dir)
    base, tok, info = load_base(model)
    ext = Extension(base, tok, info)
    ext.add(ExtensionConfig(tokens=[f"zqbench{i:05d}" for i in range(K)], init="normal", seed=0))
    ext.save(ext_dir, overwrite=True)
    return ext


def optimum_base(model_dir: Path, work: Path, V: int, H: int) -> tuple[Path, Path]:
    """optimum's own export of the base (kept as optimum wrote it, for --base-onnx), and a copy with the
    embdeploy.json that lets run_bench read it (mode base, K=0)."""
    import onnx
    from optimum.exporters.onnx import main_export

    export, bench = work / "optimum-export", work / "optimum-base"
    if not (bench / "embdeploy.json").is_file():
        for d in (export, bench):
            shutil.rmtree(d, ignore_errors=True)
        main_export(str(model_dir), output=export, task="feature-extraction")  # library as optimum-cli infers it
        shutil.copytree(export, bench)
        graph = onnx.load(str(bench / "model.onnx"), load_external_data=False).graph
        write_manifest(bench, "base", V, 0, H, [i.name for i in graph.input], [o.name for o in graph.output], None)
    return export, bench


def embdeploy_exports(ext, work: Path, optimum_dir: Path, say) -> dict[str, Path]:
    from embdeploy.export import export_base, export_extension

    cache = work / "cache"
    dirs = {"embdeploy-base": work / "embdeploy-base"}
    if not (dirs["embdeploy-base"] / "embdeploy.json").is_file():
        export_base(ext, cache_dir=cache, out=dirs["embdeploy-base"], overwrite=True)
    for mode in MODES:
        dirs[mode] = work / f"embdeploy-{mode}"
    dirs["optimum-merged"] = work / "optimum-merged"
    for label, d in dirs.items():
        if label == "embdeploy-base" or (d / "embdeploy.json").is_file():
            continue
        mode = "merged" if label == "optimum-merged" else label
        base_onnx = optimum_dir if label == "optimum-merged" else None
        res = export_extension(ext, mode, d, base_onnx=base_onnx, cache_dir=cache, overwrite=True)
        say(f"{label}: validated, max abs diff {res.report.max_abs_diff:.2e}")
    return dirs


def check_bases_agree(ext, optimum_dir: Path, ours: Path) -> float:
    """Both base exports on the same text: the sentence embeddings (or per-token states) must agree."""
    import numpy as np
    import onnxruntime as ort

    enc = ext.tokenizer(["the patient was given a blood test", "short"], padding=True, return_tensors="np")
    outs = []
    for d in (optimum_dir, ours):
        sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
        values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        outs.append(values.get("sentence_embedding", values.get("last_hidden_state", values.get("token_embeddings"))))
    diff = float(np.abs(outs[0] - outs[1]).max())
    if outs[0].shape != outs[1].shape or diff > 1e-4:
        raise EmbdeployError(f"optimum's and embdeploy's base exports disagree (max |diff| {diff:.3g}); not timing them")
    return diff


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "optimum", "optimum-onnx", "onnxruntime", "onnx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _python() -> str:
    """The interpreter as a user would type it: the repo-relative venv path (.venv-optimum/bin/python) or python."""
    try:
        return str(Path(sys.executable).relative_to(HERE.parent))
    except ValueError:
        return "python"


def header(command: str, result, vers: dict, agree: float, elapsed: float, optimum_io: str, load: str) -> str:
    m = result.machine
    lines = [
        "# optimum-onnx's base export vs embdeploy's exports (CPU)",
        "",
        "What a user would pick instead of embdeploy is the base model exported by optimum-onnx; this times it",
        "against embdeploy's base export and its three extended exports, interleaved in one run.",
        "",
        f"Made with (repository root, {elapsed:.0f} s): `{command}`  ",
        f"Machine: {m.get('cpu')}, {m.get('usable_cores')} usable cores, load average {load} when timing began, "
        f"{m.get('date')}; "
        + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".  ",
        f"optimum's export: {optimum_io}. Before timing, optimum's and embdeploy's base exports agreed on a "
        f"text to max |diff| {agree:.1e}. Cells: p50 ratio [25th–75th percentile of the per-round ratios].",
        "",
        "| variant | what it is |",
        "|---|---|",
        "| base | optimum's export (`optimum-cli export onnx --model MODEL --task feature-extraction`), the reference |",
        "| base:embdeploy-base | embdeploy's base export (torch.onnx dynamo), no new rows |",
        "| merged:embdeploy-merged, split, swap | `embdeploy export --mode M`: embdeploy's base rewritten with K new "
        "rows |",
        "| merged:optimum-merged | `embdeploy export --mode merged --base-onnx` on optimum's export |",
        "",
        "## p50 latency ratio to optimum's base export",
        "",
    ]
    shapes = result.settings["shapes"]
    lines += ["| variant | ids | " + " | ".join(shapes) + " |", "|---|---|" + "---:|" * len(shapes)]
    rows = {}
    for r in result.latency:
        rows.setdefault((r.variant, r.mix), {})[r.shape] = r
    order = ["base"] + [v.label for v in result.variants]
    for (variant, mix), by_shape in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        cells = [f"{by_shape[s].ratio_to_base:.3f} [{by_shape[s].ratio_q25:.2f}–{by_shape[s].ratio_q75:.2f}]"
                 if s in by_shape else "-" for s in shapes]
        lines.append(f"| {variant} | {mix} | " + " | ".join(cells) + " |")
    lines += ["", "The full report of the same run follows.", "", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="base model directory, or minilm (the packaged MiniLM)")
    p.add_argument("--K", type=int, default=1000, help="new tokens in the extended exports")
    p.add_argument("--shapes", default="1x16,1x128,8x128")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--no-memory", action="store_true", help="skip the session memory measurement")
    p.add_argument("--work", type=Path, default=HERE / "work" / "optimum", help="where exports are built (reused)")
    p.add_argument("--rebuild", action="store_true", help="delete --work first")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default=NAME, help="results file stem")
    args = p.parse_args(argv)

    from rich.console import Console

    from embdeploy.models import resolve_model_ref

    console = Console(stderr=True)
    say = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
    t0 = time.perf_counter()
    work = args.work / f"{Path(str(args.model)).name}-K{args.K}"
    if args.rebuild:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        ext = extension(args.model, args.K, work)
        say(f"extension: V={ext.V}, K={ext.K}, H={ext.H}")
        optimum_dir, optimum_bench = optimum_base(Path(resolve_model_ref(args.model)), work, ext.V, ext.H)
        dirs = embdeploy_exports(ext, work, optimum_dir, say)
        agree = check_bases_agree(ext, optimum_dir, dirs["embdeploy-base"])
        del ext  # the PyTorch model is not needed while timing
        optimum = load_artifact(optimum_bench)
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())  # 1, 5, 15 min: others' work skews ratios too
        result = run_bench(list(dirs.values()), base_dir=optimum_bench, shapes=parse_shapes(args.shapes),
                           threads=args.threads, rounds=args.rounds, sessions=0, memory_cost=not args.no_memory,
                           progress=say)
    except EmbdeployError as e:
        console.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        return e.exit_code
    elapsed = time.perf_counter() - t0
    command = shlex.join([_python(), "perf/bench_optimum.py", *argv])
    vers = versions()
    args.out.mkdir(parents=True, exist_ok=True)
    data = json.loads(result.to_json())
    data.update(command=command, versions=vers, bases_max_abs_diff=agree, load_average=load, seconds=round(elapsed, 1))
    (args.out / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    optimum_io = f"inputs {', '.join(optimum.inputs)}; outputs {', '.join(optimum.outputs)}"
    (args.out / f"{args.name}.md").write_text(header(command, result, vers, agree, elapsed, optimum_io, load)
                                               + markdown(result))
    out = Console() if sys.stdout.isatty() else Console(width=140)
    print_result(out, result)
    console.print(f"wrote {args.out / args.name}.{{json,md}} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
