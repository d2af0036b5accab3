"""Human-facing views of a BenchResult: a rich table, a markdown report, a PNG."""

from __future__ import annotations

from pathlib import Path

from ..errors import EmbdeployError
from .inputs import NEW_MIX
from .result import BenchResult, LatencyRow
from .texts import TEXT_MIX

MODE_COLORS = {"base": "#6b7280", "merged": "#2563eb", "split": "#d97706", "swap": "#059669"}
_EXTRA_COLORS = ["#7c3aed", "#db2777", "#0891b2", "#65a30d", "#b91c1c"]


def _ratio_text(r: LatencyRow) -> str:
    if r.variant == "base":
        return "1 (ref)"
    return f"{r.ratio_to_base:.3f} [{r.ratio_q25:.3f}–{r.ratio_q75:.3f}]"


def _variant_order(result: BenchResult) -> list[str]:
    return ["base"] + [v.label for v in result.variants]


def _sorted_rows(result: BenchResult) -> list[LatencyRow]:
    order = {label: i for i, label in enumerate(_variant_order(result))}
    shapes = {s: i for i, s in enumerate(result.settings.get("shapes", []))}
    return sorted(result.latency, key=lambda r: (r.provider, shapes.get(r.shape, 99), order.get(r.variant, 99), r.mix))


def render_table(result: BenchResult):
    """Latency table (rich.table.Table): one row per provider, shape, variant and token mix."""
    from rich.table import Table

    s = result.settings
    table = Table(
        title=f"latency, {s.get('threads')} intra-op thread(s), {s.get('rounds')} interleaved rounds",
        caption="ratio: median over rounds of (variant time / base time in the same round) [25th–75th percentile]",
    )
    for col, justify in [("provider", "left"), ("shape", "left"), ("variant", "left"), ("ids", "left"),
                         ("p50 ms", "right"), ("p90 ms", "right"), ("p99 ms", "right"), ("seq/s", "right"),
                         ("ratio to base", "right")]:
        table.add_column(col, justify=justify, overflow="fold")  # a narrow log folds a number, never cuts it
    previous = None
    for r in _sorted_rows(result):
        if previous is not None and (r.provider, r.shape) != previous:
            table.add_section()
        previous = (r.provider, r.shape)
        style = "bold red" if r.variant != "base" and r.ratio_to_base > 1.10 else None
        table.add_row(r.provider, r.shape, r.variant, r.mix, f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}",
                      f"{r.throughput_seq_s:,.1f}", _ratio_text(r), style=style)
    return table


def render_texts_table(result: BenchResult):
    """Tokens and fidelity on the user's texts (rich.table.Table), or None without --texts."""
    from rich.table import Table

    if not result.texts:
        return None
    t = Table(title=f"on your texts ({result.texts[0].texts} texts): what the extension buys",
              caption="fidelity: cosine per text, extended output vs the base on the original tokenization")
    for col in ("variant", "tokens/text base", "tokens/text ext", "fewer tokens", "fidelity mean", "fidelity min",
                "output compared"):
        t.add_column(col, justify="left" if col in ("variant", "output compared") else "right", overflow="fold")
    for r in result.texts:
        t.add_row(r.variant, f"{r.base_tokens_mean:.2f}", f"{r.tokens_mean:.2f}", f"{r.token_reduction:.1%}",
                  f"{r.fidelity_mean:.4f}", f"{r.fidelity_min:.4f}", r.fidelity_output)
    return t


def render_references_table(result: BenchResult):
    """Variants against their own base (an int8 export against the int8 base), or None when there are none."""
    from rich.table import Table

    if not result.references:
        return None
    t = Table(title="against each export's own base, same rounds: what the extension costs there",
              caption="ratio: median over rounds of (variant time / its own base's time in the same round)")
    for col in ("provider", "shape", "variant", "ids", "own base", "ratio"):
        t.add_column(col, justify="right" if col == "ratio" else "left", overflow="fold")
    for r in result.references:
        t.add_row(r.provider, r.shape, r.variant, r.mix, r.reference,
                  f"{r.ratio:.3f} [{r.ratio_q25:.3f}–{r.ratio_q75:.3f}]")
    return t


def print_result(console, result: BenchResult) -> None:
    """The latency table, the texts table with --texts, then the memory tables when measured, on a rich `console`."""
    console.print(render_table(result))
    refs = render_references_table(result)
    if refs is not None:
        console.print(refs)
    texts = render_texts_table(result)
    if texts is not None:
        console.print(texts)
    memory = render_memory_table(result)
    if memory is not None:
        console.print(memory)


def render_memory_table(result: BenchResult):
    """Session cost and N-session tables (rich renderables), or None when memory was not measured."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = []
    if result.sessions:
        t = Table(title="one session, alone in a fresh process",
                  caption="private: copies the session owns; mapped: export files memory-mapped (shareable page cache)")
        for col in ("provider", "variant", "create s", "peak MB", "RSS MB", "private MB", "mapped MB", "GPU MB"):
            t.add_column(col, justify="left" if col in ("provider", "variant") else "right")
        for c in result.sessions:
            t.add_row(c.provider, c.variant, f"{c.create_s:.2f}", f"{c.peak_mb:.0f}", f"{c.rss_mb:.0f}",
                      f"{c.private_mb:.0f}", f"{c.mapped_mb:.0f}", "-" if c.gpu_mb is None else f"{c.gpu_mb:.0f}")
        parts.append(t)
    if result.multi:
        t = Table(title=f"{result.multi[0].n} sessions in one process, each with a different extension",
                  caption="footprint = private + mapped (counted once): resident size once every row has been used")
        gpu = any(m.provider == "cuda" for m in result.multi)
        cols = ["config", "base shared by", "create s", "footprint MB", "tables MB", "shared MB", "rest/session MB"]
        for col in cols + (["GPU MB", "GPU MB/tenant"] if gpu else []):
            t.add_column(col, justify="left" if col in ("config", "base shared by") else "right")
        for m in result.multi:
            cpu = m.provider == "cpu"
            row = [m.config, m.sharing, f"{m.create_s:.2f}", f"{m.footprint_mb:.0f}" if cpu else "-",
                   f"{m.tables_mb:.0f}", f"{m.shared_mb:.0f}", f"{m.overhead_per_session_mb:.1f}" if cpu else "-"]
            if gpu:
                row += [_mb(m.gpu_mb), _mb(m.gpu_per_session_mb)]
            t.add_row(*row)
        parts.append(t)
    for s in result.skipped:
        parts.append(Text.assemble((f"skipped {s.what}: ", "yellow"), s.reason))
    return Group(*parts) if parts else None


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _disk(v) -> str:
    """', int8, 63.3 MB on disk' for a variant whose precision and size were recorded (older results: '')."""
    parts = ([v.precision] if v.precision else []) + ([f"{v.size_mb:.1f} MB on disk"] if v.size_mb is not None else [])
    return "".join(", " + p for p in parts)


def markdown(result: BenchResult) -> str:
    s, m = result.settings, result.machine
    out = ["# embdeploy bench", ""]
    out.append(f"Base: `{result.base.path}` (V={result.base.V}, H={result.base.H}{_disk(result.base)})  ")
    for v in result.variants:
        out.append(f"{v.label}: `{v.path}` ({v.mode}, K={v.K}{_disk(v)})  ")
    out += [
        "",
        f"Machine: {m.get('cpu')}, {m.get('usable_cores')} usable cores, "
        + (f"GPU {m['gpu']}, " if m.get("gpu") else "") + f"onnxruntime {m.get('onnxruntime')}, {m.get('date')}.  ",
        f"Settings: {s.get('threads')} intra-op thread(s), 1 inter-op, sequential; {s.get('warmup')} warm-up calls and "
        f"{s.get('rounds')} rounds per shape over {s.get('session_blocks')} sets of fresh sessions; new-ids mix: "
        f"{s.get('new_fraction', 0):.0%} of positions hold new ids.",
        "",
        "Ratio to base: median over rounds of (variant time / base time of the same round), with the 25th–75th "
        "percentile of the per-round ratios. Every round runs every variant once on the same inputs in a shuffled "
        "order, so machine drift cancels; compare ratios, not milliseconds, across machines.",
        "",
    ]
    if s.get("genai"):
        g = s["genai"]
        out += [f"Generation through onnxruntime-genai {g.get('onnxruntime_genai')}: `prefill:BxS` rows time "
                "`append_tokens` of B prompts of S tokens (the prompt's forward pass); `decode:BxS+N` rows time each "
                f"of the N - 1 decode steps that follow ({g.get('search')}), so p50 ms is one step and seq/s is "
                "tokens/s.", ""]
    for provider in sorted({r.provider for r in result.latency}):
        out += [f"## Latency ({provider})", "",
                "| shape | variant | ids | p50 ms | p90 ms | p99 ms | seq/s | ratio to base |",
                "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in _sorted_rows(result):
            if r.provider == provider:
                out.append(f"| {r.shape} | {r.variant} | {r.mix} | {r.p50_ms:.3f} | {r.p90_ms:.3f} | {r.p99_ms:.3f} | "
                           f"{r.throughput_seq_s:,.1f} | {_ratio_text(r)} |")
        out.append("")
    if result.references:
        out += ["## Against each export's own base", "",
                "An export whose own base differs in precision from the base above (an int8 export, rewritten from "
                "the int8 base) is also compared with that base, timed in the same rounds: the ratio to the base "
                "above is what the precision buys, this one what the extension costs.", "",
                "| provider | shape | variant | ids | own base | ratio |", "|---|---|---|---|---|---:|"]
        for r in result.references:
            out.append(f"| {r.provider} | {r.shape} | {r.variant} | {r.mix} | {r.reference} | "
                       f"{r.ratio:.3f} [{r.ratio_q25:.3f}–{r.ratio_q75:.3f}] |")
        out.append("")
    if result.texts:
        sizes = ", ".join(str(b) for b in s.get("text_batch_sizes", []))
        out += [f"## On your texts ({result.texts[0].texts} texts)", "",
                f"The base export on the original tokenization against each extended export on its extended "
                f"tokenization, same texts. Latency rows `texts/bN` (batch sizes {sizes}) above time the whole "
                "request path: tokenize the batch, pad to its longest text, run. Fidelity: cosine per text between "
                "the extended export's output and the base's on the original tokenization.", "",
                "| variant | tokens/text base | tokens/text extended | fewer tokens | tokens total base → extended | "
                "fidelity mean | fidelity min | output compared | truncated |",
                "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in result.texts:
            out.append(f"| {r.variant} | {r.base_tokens_mean:.2f} | {r.tokens_mean:.2f} | {r.token_reduction:.1%} | "
                       f"{r.base_tokens_total} → {r.tokens_total} | {r.fidelity_mean:.4f} | {r.fidelity_min:.4f} | "
                       f"{r.fidelity_output} | {r.truncated} (base {r.base_truncated}) |")
        out.append("")
    if result.sessions:
        out += ["## One session (fresh process each)", "",
                "private: anonymous memory the session owns (copies). mapped: bytes of the export's files "
                "memory-mapped by ONNX Runtime, shared through the page cache with every other session and process "
                "that maps them. peak: high-water RSS while creating the session and running it once.", "",
                "| provider | variant | create s | peak MB | RSS MB | private MB | mapped MB | GPU MB |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for c in result.sessions:
            gpu = "-" if c.gpu_mb is None else f"{c.gpu_mb:.0f}"
            out.append(f"| {c.provider} | {c.variant} | {c.create_s:.2f} | {c.peak_mb:.0f} | {c.rss_mb:.0f} | "
                       f"{c.private_mb:.0f} | {c.mapped_mb:.0f} | {gpu} |")
        out.append("")
    if result.multi:
        n = result.multi[0].n
        out += [f"## {n} sessions in one process, a different extension each", "",
                f"swap: {n} sessions of one swap export, each given its own (K, H) extension table through "
                "`SessionOptions.add_initializer`. merged: each session given its own (V+K, H) table, which is what "
                f"{n} tenants with {n} merged exports cost. footprint = private + mapped bytes counted once: the "
                "resident size once every row has been used. rest/session = (footprint − tables − shared base) / N: "
                "session overhead, including MatMul weights that ONNX Runtime prepacks into a private copy per "
                "session unless prepacking is off.", "",
                "| config | base shared by | create s | footprint MB | tables MB | shared MB | rest/session MB | RSS MB |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in result.multi:
            if r.provider == "cpu":
                out.append(f"| {r.config} | {r.sharing} | {r.create_s:.2f} | {r.footprint_mb:.0f} | {r.tables_mb:.0f} | "
                           f"{r.shared_mb:.0f} | {r.overhead_per_session_mb:.1f} | {r.rss_mb:.0f} |")
        out.append("")
        gpu_rows = [r for r in result.multi if r.provider == "cuda"]
        if gpu_rows:
            out += [f"### On the GPU ({n} tenants in one process)", "",
                    "swap: one CUDA session, each tenant's (K, H) table kept in GPU memory and fed with its runs "
                    "(IO binding; a CUDA session cannot take a table through the session options). merged: one "
                    "CUDA session per tenant's export. GPU MB: device memory the process holds with all tenants "
                    "served (nvidia-smi), CUDA context included. GPU MB/tenant: (GPU MB with N − with 1) / (N − 1), "
                    "what each further tenant costs on the device.", "",
                    "| config | base shared by | create s | tables MB | GPU MB | GPU MB/tenant |",
                    "|---|---|---:|---:|---:|---:|"]
            for r in gpu_rows:
                out.append(f"| {r.config} | {r.sharing} | {r.create_s:.2f} | {r.tables_mb:.0f} | {_mb(r.gpu_mb)} | "
                           f"{_mb(r.gpu_per_session_mb)} |")
            out.append("")
    if result.skipped:
        out += ["## Skipped", ""] + [f"- **{s.what}**: {s.reason}" for s in result.skipped] + [""]
    return "\n".join(out)


def write_markdown(result: BenchResult, path) -> Path:
    path = Path(path)
    _write(path, lambda p: p.write_text(markdown(result)))
    return path


def _write(path: Path, write) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as e:
        raise EmbdeployError(f"cannot write {path}: {e.strerror}; choose a writable path") from None


def _colors(result: BenchResult) -> dict[str, str]:
    colors, extra = {"base": MODE_COLORS["base"]}, iter(_EXTRA_COLORS)
    used = set()
    for v in result.variants:
        c = MODE_COLORS.get(v.mode)
        if c is None or c in used:
            c = next(extra, "#111827")
        used.add(c)
        colors[v.label] = c
    return colors


WIDE_IQR = 0.06  # a ratio whose 25th-75th percentile spread is wider than the ±3% band cannot be read against it


def write_plot(result: BenchResult, path) -> Path:
    """PNG: p50 latency per shape and variant (p90 whisker), the ratio to base, and N-session memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = plot_figure(result)
    _write(path, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
    return path


def _what_was_run(result: BenchResult) -> str:
    """Which model, K and rounds the figure shows."""
    import json

    model = None
    for v in result.variants:  # the base reference an extended export records (absent when only the JSON is at hand)
        try:
            rec = json.loads((Path(v.path) / "embdeploy.json").read_text()).get("base_model") or {}
            model = rec.get("portable_ref") or rec.get("ref")
        except (OSError, ValueError):
            continue
        if model:
            break
    ks = sorted({v.K for v in result.variants})
    b = result.base
    return (f"{model or 'base'} (V={b.V}, H={b.H}), K={'/'.join(map(str, ks)) or 0} new tokens, "
            f"{result.settings.get('rounds')} rounds")


def plot_figure(result: BenchResult):
    """The matplotlib figure `write_plot` saves."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    providers = sorted({r.provider for r in result.latency})
    panels = 2 * len(providers) + (1 if any(m.provider == "cpu" for m in result.multi) else 0)
    if panels == 0:
        raise EmbdeployError("nothing to plot: the run has no latency rows and no session measurements")
    colors = _colors(result)
    fig, axes = plt.subplots(panels, 1, figsize=(12, 3.8 * panels), squeeze=False)
    axes = list(axes[:, 0])
    shapes = result.settings.get("shapes") or sorted({r.shape for r in result.latency})
    series = [(v, mix) for v in _variant_order(result) for mix in ("base-ids", NEW_MIX, TEXT_MIX)
              if any(r.variant == v and r.mix == mix for r in result.latency)]

    for provider in providers:
        rows = {(r.shape, r.variant, r.mix): r for r in result.latency if r.provider == provider}
        ax_lat, ax_ratio = axes.pop(0), axes.pop(0)
        wide: list[str] = []
        x = np.arange(len(shapes))
        width = 0.8 / max(1, len(series))
        for j, (v, mix) in enumerate(series):
            hatch = "//" if mix == NEW_MIX else ".." if mix == TEXT_MIX else None
            label = {NEW_MIX: f"{v}, new ids", TEXT_MIX: f"{v}, your texts (tokenize + run)"}.get(mix, v)
            p50 = [rows[(s, v, mix)].p50_ms if (s, v, mix) in rows else np.nan for s in shapes]
            p90 = [rows[(s, v, mix)].p90_ms if (s, v, mix) in rows else np.nan for s in shapes]
            err = np.array([np.zeros(len(shapes)), np.nan_to_num(np.array(p90) - np.array(p50))])
            ax_lat.bar(x + (j - (len(series) - 1) / 2) * width, p50, width, yerr=err, capsize=2, label=label,
                       color=colors.get(v, "#111827"), hatch=hatch, edgecolor="white", linewidth=0.5)
            if v == "base":
                continue
            ratio = [rows[(s, v, mix)].ratio_to_base if (s, v, mix) in rows else np.nan for s in shapes]
            lo = [rows[(s, v, mix)].ratio_q25 if (s, v, mix) in rows else np.nan for s in shapes]
            hi = [rows[(s, v, mix)].ratio_q75 if (s, v, mix) in rows else np.nan for s in shapes]
            xs = x + (j - (len(series) - 1) / 2) * width
            ax_ratio.errorbar(xs, ratio, yerr=[np.array(ratio) - lo, np.array(hi) - ratio], fmt="D" if hatch else "o",
                              color=colors.get(v, "#111827"), mfc="white" if hatch else None, capsize=3, label=label)
            for xi, ri, l, h, s in zip(xs, ratio, lo, hi, shapes):
                if np.isnan(ri):
                    continue
                ax_ratio.annotate(f"{ri:.2f}", (xi, ri), xytext=(4, 0), textcoords="offset points", fontsize=7,
                                  va="center", color=colors.get(v, "#111827"))
                if h - l > WIDE_IQR:
                    wide.append(f"{label} at {s} (IQR {l:.2f}-{h:.2f})")
                    ax_ratio.annotate("!", (xi, h), xytext=(0, 3), textcoords="offset points", fontsize=10,
                                      ha="center", va="bottom", color="#b91c1c", fontweight="bold")
        ax_lat.set_yscale("log")
        low = min((r.p50_ms for r in rows.values()), default=1.0)
        ax_lat.set_ylim(bottom=low / 4)
        # Plain numbers (0.5, 1, 2, 5 ms) instead of 10^x; 1-2-5 steps so a short range still has labels.
        ax_lat.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax_lat.yaxis.set_major_formatter(FuncFormatter(lambda val, _: f"{val:g}"))
        ax_lat.yaxis.set_minor_formatter(NullFormatter())
        ax_lat.set_xticks(x, shapes)
        ax_lat.set_ylabel("p50 latency, ms (log)\nwhisker to p90")
        ax_lat.set_title(f"{provider}: p50 latency per shape (BxS = B texts of S tokens), raw times over all rounds",
                         loc="left", fontweight="bold")
        ax_lat.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax_lat.grid(axis="y", alpha=0.3, which="both")
        ax_ratio.axhline(1.0, color=MODE_COLORS["base"], lw=1, ls="--")
        ax_ratio.axhspan(0.97, 1.03, color=MODE_COLORS["base"], alpha=0.08, lw=0)
        ax_ratio.set_xticks(x, shapes)
        ax_ratio.set_ylabel("time / base time\n(median of rounds, IQR)")
        ax_ratio.set_title(f"{provider}: ratio to base, above 1 = slower (median of per-round ratios, so it can "
                           "differ from the bars' ratio; grey band = within ±3% of base)", loc="left",
                           fontweight="bold", fontsize=10)
        if wide:
            ax_ratio.text(0.0, -0.22, f"! IQR wider than {WIDE_IQR:.0%}, so the ratio says little: "
                          + "; ".join(wide[:4]) + ("; …" if len(wide) > 4 else "") + ". Rerun with more --rounds "
                          "or on a quieter machine.", transform=ax_ratio.transAxes, fontsize=8, color="#b91c1c",
                          va="top", wrap=True)
        ax_ratio.grid(axis="y", alpha=0.3)
        ax_ratio.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax_ratio.set_xlim(-0.5, len(shapes) - 0.5)

    cpu_multi = [m for m in result.multi if m.provider == "cpu"]
    if cpu_multi:
        ax = axes.pop(0)
        names = [m.config for m in cpu_multi]
        y = np.arange(len(names))
        shared = np.array([m.shared_mb for m in cpu_multi])
        tables = np.array([m.tables_mb for m in cpu_multi])
        rest = np.array([max(0.0, m.footprint_mb - m.shared_mb - m.tables_mb) for m in cpu_multi])
        ax.barh(y, shared, color=MODE_COLORS["base"], label="base table (once)")
        ax.barh(y, tables, left=shared, color="#f59e0b", label="per-session tables")
        ax.barh(y, rest, left=shared + tables, color="#cbd5e1", label="rest (session overhead, other weights)")
        for yi, m in zip(y, cpu_multi):
            ax.text(m.footprint_mb, yi, f"  {m.footprint_mb:.0f} MB", va="center", fontsize=9)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("MB once every row has been used (private + mapped, shared pages counted once)")
        ax.set_title(f"CPU: {cpu_multi[0].n} sessions in one process, a different extension each", loc="left",
                     fontweight="bold")
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.set_xlim(0, max(m.footprint_mb for m in cpu_multi) * 1.18)

    m = result.machine
    fig.suptitle(f"embdeploy bench: {_what_was_run(result)}, {result.settings.get('threads')} thread(s)\n"
                 f"{m.get('cpu')}" + (f", {m['gpu'].split(',')[0]}" if m.get("gpu") else "")
                 + f", onnxruntime {m.get('onnxruntime')}", fontsize=10, color="#374151")
    fig.tight_layout()
    return fig
