"""The comparison and run reports' figures and tables, without a browser (tests/test_report_browser.py looks at
them in Chromium): every run on one set of axes, whole epochs counted from 1, text readable on heatmaps."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from _runs_helpers import fake_run  # noqa: E402
from pneumodet.cli import main  # noqa: E402
from pneumodet.plotting import annotate_cells, text_color_on  # noqa: E402
from pneumodet.reports import runs as run_reports  # noqa: E402


def _tick_labels(ax) -> list[str]:
    """The x tick labels drawn inside the axis' range."""
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    return [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks(), strict=True)
            if low <= x <= high and t.get_text()]


def test_compare_puts_runs_differing_in_encoder_and_aug_on_one_set_of_axes(tmp_path: Path, capsys) -> None:
    """Before: four figures of one one-point line each (by aug, by encoder), ticks at -0.04...0.04."""
    runs = [fake_run(tmp_path / "runs", "resnet50", "heavy", epochs=1, seed=0),
            fake_run(tmp_path / "runs", "se_resnext50", "light", epochs=1, seed=1)]
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    assert "compared 2 run(s)" in capsys.readouterr().out
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert 'id="all_runs"' in html
    # no panel of a single run: the per-factor sections say why they are empty instead
    for anchor in ("by_aug", "by_encoder", "by_samples"):
        section = html.split(f'id="{anchor}"', 1)[1].split("</section>", 1)[0]
        assert "<img" not in section and "No two runs compared differ only in" in section
    assert sorted(p.name for p in (tmp_path / "cmp").glob("*.png")) == ["all_runs.png"]

    infos = [run_reports.read_run(r) for r in runs]
    fig = run_reports._all_runs_figure(infos)
    curves = [ax for ax in fig.axes if ax.lines]
    assert len(curves) == len(run_reports.CURVES)
    for ax in curves:
        assert len(ax.lines) == 2  # both runs on the same axes
        assert _tick_labels(ax) == ["1"]  # one whole epoch, counted from 1
    legend = [t.get_text() for leg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if leg
              for t in leg.get_texts()]
    assert legend == [r.name for r in runs]


def test_compare_of_a_grid_has_per_factor_views_with_whole_epochs_from_1(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "runs", e, a, samples=n, epochs=6, seed=i)
            for i, (e, a, n) in enumerate([(e, a, n) for e in ("resnet50", "se_resnext50")
                                            for a in ("light", "heavy") for n in (100, 200)])]
    result = run_reports.compare_runs(runs, tmp_path / "cmp")
    assert result.compared == 8
    assert sorted(p.name for p in (tmp_path / "cmp").glob("*.png")) == [
        "all_runs.png", "by_aug.png", "by_encoder.png", "by_samples.png"]
    table = pd.read_csv(tmp_path / "cmp" / "best_map.csv")
    for run in runs:
        metrics = pd.read_csv(Path(run) / "metrics.csv")
        row = table[table["run"] == Path(run).name].iloc[0]
        assert row["best_epoch"] == metrics.loc[metrics["val_map"].idxmax(), "epoch"] + 1  # stored from 0
        assert row["samples"] in (100, 200) and row["epochs"] == 6
    infos = [run_reports.read_run(r) for r in runs]
    groups = run_reports._factor_groups(infos, ("aug",), "encoder")
    assert [name for name, _ in groups] == ["aug heavy", "aug light"]
    fig = run_reports._factor_figure(groups, "encoder", "t")
    for ax in fig.axes:
        assert _tick_labels(ax) == ["1", "2", "3", "4", "5", "6"]
        assert len(ax.lines) == 4  # two encoders x two sample sizes share each aug
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["resnet50 · 100 patients", "resnet50 · 200 patients", "se_resnext50 · 100 patients",
                      "se_resnext50 · 200 patients"]


def test_run_report_leads_with_results_and_ends_with_the_configuration(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "resnet18", "light", epochs=4, seed=3)
    html = run_reports.write_run_report(run).read_text()
    order = re.findall(r'<section class="report-section" id="([^"]+)"', html)
    assert order[:2] == ["overview", "losses"] and order[-1] == "configuration"
    metrics = pd.read_csv(run / "metrics.csv")
    best = int(metrics.loc[metrics["val_map"].idxmax(), "epoch"]) + 1
    assert f"at epoch {best} of 4" in html
    assert "Training has not finished" in html
    # the metrics table counts epochs from 1, as train prints them
    table = html.split('id="map"', 1)[1].split("<tbody>", 1)[1]
    assert re.findall(r"<tr><td[^>]*>(\d+)</td>", table) == ["1", "2", "3", "4"]


@pytest.mark.parametrize(("rgba", "expected"), [((0.03, 0.19, 0.42, 1), "white"), ((0.97, 0.98, 1.0, 1), "black"),
                                                ((0.5, 0.5, 0.5, 1), "black"), ((0.0, 0.0, 0.0, 1), "white")])
def test_text_colour_follows_the_cell_luminance(rgba, expected) -> None:
    assert text_color_on(rgba) == expected


def test_confusion_counts_are_white_on_dark_cells_and_black_on_light_ones() -> None:
    import matplotlib.pyplot as plt

    counts = np.array([[50, 2, 0], [3, 40, 9], [1, 6, 30]])
    fig, ax = plt.subplots()
    image = ax.imshow(counts, cmap="Blues")
    annotate_cells(ax, image, counts)
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    plt.close(fig)
    assert colours["50"] == "white" and colours["40"] == "white"  # the darkest blues
    assert colours["0"] == "black" and colours["2"] == "black"  # near white


def test_a_chart_says_the_pixel_height_of_its_smallest_text() -> None:
    """What the browser test scales by the displayed width: the smallest drawn text, ticks included."""
    import matplotlib.pyplot as plt

    from pneumodet.reports.html import HtmlReport

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1, 2], [1, 2])
    ax.tick_params(labelsize=7)  # tick labels get their text only when drawn: they must count
    ax.set_title("title", fontsize=14)
    report = HtmlReport("r")
    section = report.section("Chart", "chart")
    section.figure(fig, dpi=100)
    section.image(np.zeros((4, 4), dtype=np.uint8), "a photo")
    html = report.render()
    assert re.findall(r'data-min-text-px="([\d.]+)"', html) == [f"{7 * 100 / 72:.1f}"]  # the photo has none
