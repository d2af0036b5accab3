"""What the bench plot says: which model, K and rounds; which way a ratio goes; what the band is; that bars and
ratios are different statistics; plain tick labels on the log axis; a warning where the IQR is too wide."""

from __future__ import annotations

import json

import pytest

from embdeploy.bench.inputs import BASE_MIX
from embdeploy.bench.report import WIDE_IQR, plot_figure, write_plot
from embdeploy.bench.result import BenchResult, LatencyRow, VariantInfo

V, H, K = 300, 32, 7


def row(shape, variant, p50, ratio, q25, q75):
    return LatencyRow(provider="cpu", shape=shape, variant=variant, mode=variant, mix=BASE_MIX, p50_ms=p50,
                      p90_ms=p50 * 1.1, p99_ms=p50 * 1.2, mean_ms=p50, throughput_seq_s=1.0, ratio_to_base=ratio,
                      ratio_q25=q25, ratio_q75=q75, calls=9)


@pytest.fixture
def result(tmp_path):
    swap = tmp_path / "onnx-swap"
    swap.mkdir()
    (swap / "embdeploy.json").write_text(json.dumps({"base_model": {"ref": "/abs/site-packages/model",
                                                                    "portable_ref": "minilm"}}))
    rows = [row("1x16", "base", 0.4, 1.0, 1.0, 1.0), row("8x128", "base", 30.0, 1.0, 1.0, 1.0),
            row("1x16", "swap", 0.42, 1.02, 1.01, 1.03),  # narrow: no warning
            row("8x128", "swap", 38.0, 1.04, 0.90, 1.30)]  # wide: warned
    return BenchResult(settings={"threads": 1, "rounds": 30, "shapes": ["1x16", "8x128"]},
                       machine={"cpu": "test cpu", "onnxruntime": "1.x"},
                       base=VariantInfo(label="base", mode="base", path=str(tmp_path / "base"), V=V, K=0, H=H),
                       variants=[VariantInfo(label="swap", mode="swap", path=str(swap), V=V, K=K, H=H)], latency=rows)


def texts_of(fig) -> str:
    parts = [fig.get_suptitle()] + [ax.get_title(loc=loc) for ax in fig.axes for loc in ("left", "center")]
    parts += [t.get_text() for ax in fig.axes for t in ax.texts]
    return " ".join(" ".join(parts).split())


def test_the_plot_says_what_it_shows(result):
    fig = plot_figure(result)
    text = texts_of(fig)
    assert f"minilm (V={V}, H={H}), K={K} new tokens, 30 rounds, 1 thread(s)" in text
    assert "above 1 = slower" in text and "grey band = within ±3% of base" in text
    assert "raw times over all rounds" in text and "median of per-round ratios" in text
    assert "BxS = B texts of S tokens" in text


def test_a_wide_iqr_is_flagged_and_a_narrow_one_is_not(result):
    text = texts_of(plot_figure(result))
    assert f"IQR wider than {WIDE_IQR:.0%}" in text
    assert "swap at 8x128 (IQR 0.90-1.30)" in text and "at 1x16" not in text
    result.latency[-1] = row("8x128", "swap", 38.0, 1.04, 1.03, 1.05)
    assert "IQR wider" not in texts_of(plot_figure(result))


def test_log_axis_ticks_are_plain_milliseconds(result, tmp_path):
    fig = plot_figure(result)
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all("10^" not in s and "$" not in s for s in labels)
    assert {"1", "10"} <= set(labels)
    assert write_plot(result, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
