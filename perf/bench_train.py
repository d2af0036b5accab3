"""Benchmark the train stage on the packaged MiniLM and the shipped clinical demo data.

    python perf/bench_train.py                  # quality goal + step time/memory, prints markdown
    python perf/bench_train.py --json out.json  # also write the figures as JSON
    python perf/bench_train.py --skip-quality   # only extension-only vs full fine-tuning steps

Quality: held-out sentence cosine, token cosine and retrieval of the 50 demo terms for
random rows (init=normal), subword-mean rows, and subword-mean rows after `train` with
its default settings (wall time of the whole `train` call, data preparation included).

Steps: one distillation step (forward, backward, optimizer step) on the same batch of
32 training contexts, (a) extension-only as `train` runs it (K×H rows in AdamW) and
(b) full fine-tuning of the same extended model (every parameter in AdamW). Each runs
in its own child process; peak memory is the growth of the resident set's high-water
mark over the process's resident set before the first step (Linux: the mark is reset
through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MB = 1 << 20


def _ext(init="subword-mean"):
    from embdeploy.extend.config import ExtensionConfig, read_token_file
    from embdeploy.extend.model import Extension
    from embdeploy.models import load_base
    from embdeploy.train import demo_file

    model, tok, info = load_base("minilm")
    ext = Extension(model, tok, info)
    ext.add(ExtensionConfig(tokens=read_token_file(demo_file("terms.txt")), init=init))
    return ext


def quality(device: str = "cpu") -> dict:
    from embdeploy.train import Evaluator, TrainConfig, demo_file, read_texts, train

    held, texts = read_texts(demo_file("heldout.txt")), read_texts(demo_file("train.txt"))
    out = {}
    ext = _ext("normal")
    out["random_init"] = Evaluator(ext, held).run().to_json()
    ext = _ext()
    t0 = time.perf_counter()
    rec = train(ext, texts, TrainConfig(device=device), eval_texts=held, progress=False)
    wall = time.perf_counter() - t0
    out["subword_mean_init"] = rec.eval_before
    out["trained"] = rec.eval_after
    out["train"] = {"wall_s": round(wall, 1), "steps": rec.steps, "lr": rec.lr, "batch_size": rec.batch_size,
                    "pooled": rec.pooled, "loop_s": rec.loop_s, "tokens_per_s": rec.tokens_per_s, "first_loss": rec.first_loss,
                    "final_loss": rec.final_loss, "contexts": rec.contexts, "device": rec.device}
    return out


# ----------------------------------------------------------------------------- step comparison (child)
def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _hwm() -> int:
    import resource

    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step_child(mode: str, steps: int, batch: int, device: str = "cpu") -> dict:
    import torch

    from embdeploy.train import demo_file, read_texts
    from embdeploy.train.align import build_examples
    from embdeploy.train.objectives import make_objective, pad_id
    from embdeploy.train.texts import harvest_contexts

    ext = _ext()
    ext.model.to(device)
    cuda = ext.model.device.type == "cuda"
    ctx = harvest_contexts(ext, read_texts(demo_file("train.txt")))
    examples = build_examples(ext, ctx.texts, causal=False)
    obj = make_objective("distill", ext, examples, False, pad_id(ext.tokenizer))
    obj.setup()
    items = list(range(batch))
    if mode == "full":
        for p in ext.model.parameters():
            p.requires_grad_(True)
        params = [p for p in ext.model.parameters()]
    else:
        params = obj.parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    module = obj.module()
    n_params = sum(p.numel() for p in params)
    times = []
    rss0 = _rss_now()
    reset = _reset_hwm()
    if cuda:
        torch.cuda.synchronize()
        gpu0 = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for s in range(steps + 3):
        t0 = time.perf_counter()
        loss, n_tok = obj.loss(module, items, s, 0, 1.0 / batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()  # the step is done when the device is
        if s >= 3:  # warm-up steps are not timed
            times.append(time.perf_counter() - t0)
    gpu = {}
    if cuda:
        gpu = {"gpu": torch.cuda.get_device_name(), "gpu_peak_growth_mb": round((torch.cuda.max_memory_allocated() - gpu0) / MB, 1)}
    return {**gpu, "device": str(ext.model.device),
        "mode": mode, "trainable_params": n_params, "batch": batch, "tokens": n_tok,
        "step_ms_median": round(1000 * statistics.median(times), 1), "step_ms_min": round(1000 * min(times), 1),
        "rss_before_mb": round(rss0 / MB, 1), "peak_rss_mb": round(_hwm() / MB, 1),
        "peak_growth_mb": round((_hwm() - rss0) / MB, 1) if reset else None,
        "threads": torch.get_num_threads(),
    }


def steps_compare(steps: int, batch: int, threads: int | None = None, device: str = "cpu") -> list[dict]:
    out = []
    for mode in ("extension", "full"):
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(steps), "--batch", str(batch), "--device", device]
        if threads:
            cmd += ["--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"child {mode} failed:\n{res.stderr[-3000:]}")
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


# ----------------------------------------------------------------------------- report
def markdown(q: dict | None, s: list[dict] | None) -> str:
    import torch

    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
             f"load average at the end {os.getloadavg()[0]:.1f}.", ""]
    if q:
        lines += ["| rows | sentence cos mean | sentence cos min | token cos mean | retrieval |", "|---|---|---|---|---|"]
        for label, key in (("random (init normal)", "random_init"), ("subword-mean init", "subword_mean_init"),
                           ("after `train`, defaults", "trained")):
            r = q[key]
            lines.append(f"| {label} | {r['sentence_cos_mean']:.3f} | {r['sentence_cos_min']:.3f} | "
                         f"{r['token_cos_mean']:.3f} | {r['retrieval_accuracy']:.2f} |")
        t = q["train"]
        lines += ["", f"`train` defaults on {t.get('device', 'cpu')}: {t['steps']} steps, batch {t['batch_size']}, lr {t['lr']}, pooled={t['pooled']}: "
                  f"{t['wall_s']} s wall for the whole call, {t['loop_s']:.0f} s of it in the steps ({t['tokens_per_s']:.0f} tokens/s), loss {t['first_loss']:.4f} -> {t['final_loss']:.4f}", ""]
    if s:
        gpu = "gpu_peak_growth_mb" in s[0]
        if gpu:
            lines += [f"Steps on {s[0]['gpu']} ({s[0]['device']}); memory is the growth of torch's peak allocated GPU memory.", ""]
            for r in s:
                r["peak_growth_mb"] = r["gpu_peak_growth_mb"]
        lines += ["| training | trainable params | step (median) | peak memory growth | peak RSS |", "|---|---|---|---|---|"]
        for r in s:
            growth = "n/a" if r["peak_growth_mb"] is None else f"{r['peak_growth_mb']:.0f} MiB"
            lines.append(f"| {r['mode']} | {r['trainable_params']:,} | {r['step_ms_median']:.1f} ms | {growth} | {r['peak_rss_mb']:.0f} MiB |")
        e, f = s
        lines += ["", f"Same batch ({e['batch']} contexts, {e['tokens']} tokens): full fine-tuning takes "
                  f"{f['step_ms_median'] / e['step_ms_median']:.2f}x the step time"
                  + (f" and {f['peak_growth_mb'] / max(e['peak_growth_mb'], 1):.1f}x the peak memory growth" if e["peak_growth_mb"] else "")
                  + " of extension-only training."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode (after 3 warm-up steps)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (train and the step comparison)")
    ap.add_argument("--child", choices=("extension", "full"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(step_child(a.child, a.steps, a.batch, a.device)))
        return
    q = None if a.skip_quality else quality(a.device)
    s = None if a.skip_steps else steps_compare(a.steps, a.batch, a.threads, a.device)
    text = markdown(q, s)
    print(text)
    if a.json:
        a.json.write_text(json.dumps({"quality": q, "steps": s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
