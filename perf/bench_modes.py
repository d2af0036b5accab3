"""Benchmark the export modes against the base model; write perf/results/NAME.{json,md,png}.

    python perf/bench_modes.py                              # build MiniLM exports, then bench
    python perf/bench_modes.py --build synthetic            # no torch needed
    python perf/bench_modes.py out/swap out/merged --base out/base   # exports you already have

Building MiniLM exports uses the packaged all-MiniLM-L6-v2, torch.onnx
(dynamo) for the base graph and embdeploy.onnx.rewrite for the three modes,
with K random extension rows (timing and memory do not depend on their
values). Exports from `embdeploy export` can be passed instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from synth_models import build_synthetic, write_manifest  # noqa: E402

from embdeploy.bench import (  # noqa: E402
    DEFAULT_ROUNDS, parse_shapes, print_result, run_bench, save_baseline, write_markdown,
    write_plot,
)
from embdeploy.errors import EmbdeployError  # noqa: E402

MODES = ("base", "merged", "split", "swap")


def build_minilm(out: Path, K: int, seed: int = 0) -> dict[str, Path]:
    """MiniLM base export plus the three rewrites, under `out`; reused when already there."""
    if all((out / m / "embdeploy.json").is_file() for m in MODES):
        return {m: out / m for m in MODES}
    import numpy as np
    import torch
    from transformers import AutoModel

    from embdeploy.models import packaged_minilm_dir
    from embdeploy.onnx import io, rewrite

    model = AutoModel.from_pretrained(packaged_minilm_dir()).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.randint(1000, 30000, (2, 16))
    dyn = {n: {0: "batch", 1: "seq"} for n in names}
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(Hidden(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), dynamo=True,
                                input_names=names, output_names=["last_hidden_state"], dynamic_shapes=dyn)
    program.save(str(raw / "model.onnx"), external_data=True)
    graph = io.load_model(raw / "model.onnx")
    table = model.embeddings.word_embeddings.weight.detach().numpy()
    V, H = table.shape
    rng = np.random.default_rng(seed)
    ext = (table.mean(0) + rng.standard_normal((K, H)) * table.std()).astype(np.float32)
    dirs = {}
    for mode in MODES:
        d = out / mode
        if mode == "base":
            m = graph
        else:
            fn = {"merged": rewrite.rewrite_merged, "split": rewrite.rewrite_split, "swap": rewrite.rewrite_swap}[mode]
            m, _ = fn(graph, table, ext)
        separate = {rewrite.EXT_EMBED: "extension.data"} if mode in ("split", "swap") else None
        io.save_model(m, d, separate=separate)
        write_manifest(d, mode, V, K, H, names, ["last_hidden_state"], out / "base")
        dirs[mode] = d
    return dirs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", type=Path, help="export directories (default: build them)")
    p.add_argument("--base", type=Path, help="the base export, when not among DIRS nor recorded by them")
    p.add_argument("--build", choices=["minilm", "synthetic"], default="minilm")
    p.add_argument("--work", type=Path, default=HERE / "work", help="where built exports go (reused)")
    p.add_argument("--K", type=int, default=1000, help="extension rows of built exports")
    p.add_argument("--shapes", default="1x16,1x128,8x128")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--sessions", type=int, default=8, help="N for the N-sessions memory comparison (0: skip)")
    p.add_argument("--providers", default="cpu")
    p.add_argument("--name", default=None, help="results file stem (default: the build kind, or 'custom')")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--save-baseline", type=Path, help="also write the ratios as a baseline here")
    args = p.parse_args(argv)

    from rich.console import Console

    console = Console(stderr=True)
    t0 = time.perf_counter()
    try:
        if args.dirs:
            dirs, base, name = list(args.dirs), args.base, args.name or "custom"
        else:
            work = args.work / f"{args.build}-K{args.K}"
            console.print(f"building {args.build} exports in {work}")
            built = (build_minilm(work, args.K) if args.build == "minilm"
                     else build_synthetic(work, K=args.K, layers=6))
            dirs, base, name = [built[m] for m in MODES if m != "base"], built["base"], args.name or args.build
        result = run_bench(dirs, base_dir=base, shapes=parse_shapes(args.shapes), providers=args.providers,
                           threads=args.threads, rounds=args.rounds, sessions=args.sessions,
                           progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    except EmbdeployError as e:
        console.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        return e.exit_code
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(result.to_json() + "\n")
    write_markdown(result, args.out / f"{name}.md")
    write_plot(result, args.out / f"{name}.png")
    if args.save_baseline:
        save_baseline(result, args.save_baseline)
    out = Console() if sys.stdout.isatty() else Console(width=140)
    print_result(out, result)
    console.print(f"wrote {args.out / name}.{{json,md,png}} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
