"""report.html: one self-contained file whose sections all render, and degrade when inputs are missing."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bif import schema as S
from bif.report import SECTIONS, markdown_summary, topk_markdown, topk_records, write_report

_IMG = re.compile(r"<img [^>]*src=\"([^\"]*)\"")


def _decoded_pngs(text: str) -> list[np.ndarray]:
    from matplotlib.image import imread

    images = []
    for src in _IMG.findall(text):
        assert src.startswith("data:image/png;base64,"), src[:60]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        images.append(imread(io.BytesIO(raw), format="png"))
    return images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny digits run with diagnostics and quality results, plus its problem (for images)."""
    from run_fixtures import make_run
    from bif.quality.diagnostics import write_diagnostics
    from bif.quality.run import run_gates

    r = make_run(tmp_path_factory.mktemp("report") / "run", n_train=60, n_query=8, num_draws=20,
                 draws_per_block=10, train_epochs=20)
    write_diagnostics(r.uri, None, num_chains=r.config.sampler.num_chains, num_batches=4)
    run_gates(r.uri, None, r.config, n_train=r.n_train, n_query=r.n_query, loss_bounds=(0.0, np.inf))
    return r


def test_full_report_is_self_contained(run):
    uri = write_report(run.uri, problem=run.problem, num_queries=2, k=3)
    assert uri == f"{run.uri}/{S.REPORT_FILE}"
    text = Path(uri).read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in text.replace("&lt;", "<").replace("&gt;", ">").replace("&#x27;", "'")
    assert 'class="missing"' not in text  # every input exists, so no section degrades
    assert "Quality gates passed" in text and "samples have rank R-hat" in text
    images = _decoded_pngs(text)
    # traces, diagnostics, heatmap figures + 2 queries x (1 + 2 directions x 3 examples) digit images
    assert len(images) == 3 + 2 * (1 + 2 * 3)
    assert all(im.ndim == 3 and im.shape[0] >= 64 and im.shape[1] >= 64 for im in images)
    assert not re.search(r"(src|href)=\"(https?:|//)", text)  # nothing loaded from the network
    assert "(label " in text  # digit labels from problem.extras


def test_report_without_problem_lists_ids(run):
    import pandas as pd

    from bif.report import _fmt

    text = Path(write_report(run.uri, num_queries=1, k=2)).read_text()
    assert len(_decoded_pngs(text)) == 3
    topk = pd.read_parquet(Path(run.uri) / S.TOPK_FILE)
    strongest = topk.assign(a=topk[S.BIF].abs()).groupby(S.QUERY)["a"].max().idxmax()
    assert re.findall(r"<h3>query (\d+)</h3>", text) == [str(strongest)]  # only the most strongly influenced query
    shown = topk[(topk[S.QUERY] == strongest) & (topk[S.RANK] < 2)]
    assert len(shown) == 4
    for row in shown.itertuples(index=False):  # each listed example: its id, bif and bif_corr from topk.parquet
        cell = (f"<td><br>train {getattr(row, S.TRAIN)}<br>bif {_fmt(float(getattr(row, S.BIF)))}"
                f"<br>corr {_fmt(float(getattr(row, S.BIF_CORR)))}</td>")
        assert cell in text, cell
    assert text.count("<td><br>train ") == 4  # and nothing else is listed


def test_report_shows_constant_trace_counts(run, tmp_path):
    import xarray as xr

    uri = tmp_path / "const"
    shutil.copytree(run.uri, uri)
    flags = xr.Dataset({S.TRAIN_CONSTANT: (S.TRAIN_DIM, np.arange(run.n_train) < 15),
                        S.QUERY_CONSTANT: (S.QUERY_DIM, np.zeros(run.n_query, dtype=bool))})
    flags.to_zarr(uri / S.BIF_ZARR, mode="a", consolidated=False)
    text = Path(write_report(str(uri))).read_text()
    assert "Constant loss traces: train 15 of 60 (25.0%), query 0 of 8 (0.0%)." in text
    assert "constant loss traces: train 15 of 60, query 0 of 8" in markdown_summary(str(uri))
    assert "Constant loss traces" not in Path(write_report(run.uri)).read_text()  # a store without flags


def test_text_problem_gets_snippets(run):
    class TextProblem:
        extras: dict = {}

        @staticmethod
        def render(split, i):
            return f"<{split} sentence #{i}>"

    text = Path(write_report(run.uri, problem=TextProblem(), num_queries=1, k=2)).read_text()
    assert "&lt;query sentence #" in text and "&lt;train sentence #" in text  # escaped snippets
    assert len(_decoded_pngs(text)) == 3


def test_each_section_degrades_when_its_input_is_missing(run, tmp_path):
    uri = tmp_path / "partial"
    shutil.copytree(run.uri, uri)
    for name in (S.HEALTH_DIR, S.BIF_ZARR, S.QUALITY_DIR):
        shutil.rmtree(uri / name)
    for name in (S.DIAGNOSTICS_FILE, S.TOPK_FILE, S.MANIFEST_FILE, S.CONFIG_FILE):
        (uri / name).unlink()
    text = Path(write_report(str(uri))).read_text()
    for title in SECTIONS:
        assert title.replace("<", "&lt;").replace(">", "&gt;") in text
    assert text.count('class="missing"') == len(SECTIONS)
    assert _decoded_pngs(text) == []
    assert "_not run_" in markdown_summary(str(uri)) and topk_markdown(str(uri)) == "_no topk.parquet_\n"


def test_markdown_artifacts(run):
    md = markdown_summary(run.uri)
    assert "**Status:** complete" in md and "passed: 0 failed" in md
    assert "| train | 60 |" in md and "| query | 8 |" in md and "bif: 60 train x 8 query" in md
    records = topk_records(run.uri, num_queries=2, k=3)
    assert len(records) == 2 * 2 * 3 and set(records[0]) == set(S.TOPK_COLUMNS)
    assert [r[S.DIRECTION] for r in records[:6]] == ["positive"] * 3 + ["negative"] * 3
    assert all(isinstance(r[S.BIF], float) for r in records)
    table = topk_markdown(run.uri, num_queries=2, k=3)
    assert table.count("\n") == 2 + 12 and table.startswith("| query | direction | rank | train | bif | bif_corr |")


def test_cli_report_rebuilds_problem(run, capsys):
    from bif.flows.cli_report import main

    (Path(run.uri) / S.REPORT_FILE).unlink(missing_ok=True)
    assert main([run.uri, "--problem-from-config", "--queries", "1", "-k", "2"]) == 0
    text = (Path(run.uri) / S.REPORT_FILE).read_text()
    assert len(_decoded_pngs(text)) == 3 + 1 + 2 * 2
    assert main([str(Path(run.uri) / "nowhere")]) == 2
    assert "is it a bif run output" in capsys.readouterr().err


@pytest.mark.slow
def test_report_renders_in_headless_chromium(run, tmp_path):
    """Debian's chromium loads every embedded image (screenshot kept for a person to look at)."""
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    uri = write_report(run.uri, problem=run.problem, num_queries=2, k=3)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}"]
    # the DOM after load: a script counts the images that decoded (naturalWidth > 0)
    probe = tmp_path / "probe.html"
    probe.write_text(Path(uri).read_text().replace(
        "</body>", "<script>window.onload=()=>{const i=[...document.images];document.title="
                   "'loaded '+i.filter(x=>x.complete&&x.naturalWidth>0).length+' of '+i.length}</script></body>"))
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    n = len(_IMG.findall(Path(uri).read_text()))
    assert f"<title>loaded {n} of {n}</title>" in dom
    shot = Path(run.uri) / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,3000", Path(uri).as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, Path("/tmp") / "bif-report-screenshot.png")


def test_sections_built_ahead_give_the_same_report(run):
    """The flow draws the sections that need no check on a worker while the checks run (build_sections) and the
    report takes them (prebuilt): the same HTML as a report built in one go."""
    from bif.report import DIAGNOSTICS_SECTION, EARLY_SECTIONS, build_report_html, build_sections

    ahead = build_sections(run.uri, problem=run.problem, num_queries=2, k=3)
    assert set(ahead) == set(EARLY_SECTIONS)
    whole = build_report_html(run.uri, problem=run.problem, num_queries=2, k=3, status="complete")
    assert build_report_html(run.uri, problem=None, num_queries=2, k=3, status="complete", prebuilt=ahead) == whole
    # the diagnostics' section, drawn as soon as they finish (the flow does this while the gates may still run)
    diag = build_sections(run.uri, titles=(DIAGNOSTICS_SECTION,))
    assert list(diag) == [DIAGNOSTICS_SECTION] and "<img" in diag[DIAGNOSTICS_SECTION]
    assert build_report_html(run.uri, problem=None, num_queries=2, k=3, status="complete",
                             prebuilt=ahead | diag) == whole
    # a prebuilt section is taken as given, not rebuilt
    marked = dict(ahead, **{EARLY_SECTIONS[0]: "<p>prebuilt-marker</p>"})
    assert "prebuilt-marker" in build_report_html(run.uri, problem=run.problem, prebuilt=marked)


@pytest.mark.parametrize("scale", [1e-7, 1.0, 123456.789])
@pytest.mark.parametrize("panels", [1, 2, 3])
def test_figure_margins_hold_every_label(scale, panels):
    """The report's figures use fixed margins in inches (bif.report._figure) instead of constrained layout: tick
    labels of tiny and large values, axis labels, titles, legends and colorbars stay inside the figure, and
    panels do not overlap their neighbour's labels, at the widths the sections use."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    from bif.report import _figure

    rng = np.random.default_rng(0)
    for width, gap, colorbar in ((5.0 * panels, 0.75, False), (7.0 * panels, 1.3, True)):
        fig, axes = _figure(1, panels, figsize=(width, 3.8), squeeze=False, gap=gap)
        for ax in axes[0]:
            if colorbar:
                im = ax.imshow(-scale * rng.random((30, 20)), aspect="auto")
                fig.colorbar(im, ax=ax)
                ax.set_ylabel("train (300 of 1697)")
            else:
                ax.plot(np.arange(1000), scale * (1.2345 + rng.random(1000)), label="chain 0")
                ax.legend(fontsize=8)
            ax.set_title("mean train loss")
            ax.set_xlabel("draw")
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        whole = Bbox.from_bounds(0, 0, fig.bbox.width + 0.5, fig.bbox.height + 0.5)
        boxes = [a.get_tightbbox(renderer) for a in fig.axes]
        for box in boxes:
            assert whole.x0 - 0.5 <= box.x0 and box.x1 <= whole.x1 and whole.y0 - 0.5 <= box.y0 and box.y1 <= whole.y1, (
                scale, panels, colorbar, box, whole)
        panel_boxes = [ax.get_tightbbox(renderer) for ax in axes[0]]
        for a, b in zip(panel_boxes, panel_boxes[1:]):
            assert not a.overlaps(b), (scale, panels, colorbar)
