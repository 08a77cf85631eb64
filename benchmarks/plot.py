"""Every target's ratio against its target, in one picture: docs/benchmarks.png (README: Benchmarks).

    python -m benchmarks.plot [--pipeline docs/benchmarks.json] [--scale docs/benchmarks_scale.json]
                              [--out docs/benchmarks.png]

Reads the JSON that ``make bench`` (``benchmarks.pipeline``) and ``python -m benchmarks.scale`` write; either may be
missing, and its rows are left out. One row per target: every round or run as a grey dot, the figure the command
reports (a median, or the one run) as a large dot, green where it meets its target and red where not, and the
target as a vertical bar. Ratios are ours over the reference, so left of the bar is better; the x-axis is
logarithmic (the devinterp ratio is ~0.08, the targets 1.1-2).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    label: str
    value: float  # the figure the benchmark reports
    target: float  # met when value <= target
    rounds: list[float] = field(default_factory=list)  # every round / run behind the figure

    @property
    def met(self) -> bool:
        return self.value <= self.target


def rows(pipeline: dict | None, scale: dict | None) -> list[Row]:
    """The plotted rows, in the README's target order, from the two benchmark JSONs (None: not measured)."""
    out: list[Row] = []
    s = (pipeline or {}).get("sampler")
    if s:
        runs = s.get("runs", [])
        out += [
            Row("1: whole bif run / bare loop,\nchains one after another",
                s["whole_run_ratio_vs_bare_2_chains_sequential"], 2.0, [r["whole_run_ratio"] for r in runs]),
            Row("3: per draw / bare loop,\nsame parallelism", s["per_draw_ratio_vs_bare_same_parallelism"], 1.1,
                [r["per_draw_ratio"] for r in runs]),
        ]
        if s.get("per_draw_ratio_vs_bare_same_ops_same_parallelism") is not None:
            out.append(Row("3: per draw / same-ops bare loop", s["per_draw_ratio_vs_bare_same_ops_same_parallelism"],
                           1.1, [r["per_draw_ratio_same_ops"] for r in runs if "per_draw_ratio_same_ops" in r]))
    c = (scale or {}).get("checks")
    if c:
        out += [Row("2: gates / covariance stage,\n50k x 500 x 200", c["gates_over_reduction"], 2.0,
                    c.get("gates_over_reduction_rounds", [])),
                Row("2: R-hat/ESS / covariance stage", c["diagnostics_over_reduction"], 2.0,
                    c.get("diagnostics_over_reduction_rounds", []))]
    lim = (scale or {}).get("limit_100k")
    if lim:
        out.append(Row("4: covariance stage / its limit,\n100k x 1k x 200", lim["ratio_vs_limit"], 2.0,
                       [t / lim["limit_s"] for t in lim.get("stage_runs_s", [])]))
    lim = (scale or {}).get("limit_20k")
    if lim:
        out.append(Row("4: covariance stage / float64 GEMM,\n20k x 1k x 400", lim["ratio_vs_gemm64"], 2.0,
                       [t / lim["gemm64_s"] for t in lim.get("stage_runs_s", [])]))
    cov = (pipeline or {}).get("covariance")
    if cov and cov.get("ratio_vs_gemm") is not None:  # make bench's: the stage after its sampler part
        out.append(Row("4: the same in make bench\n(after its sampler part)", cov["ratio_vs_gemm"], 2.0,
                       [t / cov["gemm_s"] for t in cov.get("dask_reduction_runs_s", [])]))
    big = (scale or {}).get("scale")
    if big:
        out.append(Row("5: peak memory / 2 GB,\n1M x 100 x 100 out of core", big["stage_peak_rss_gb"] / 2.0, 1.0))
    if cov and cov.get("devinterp_s"):
        out.append(Row("peer: covariance time / devinterp 2.0.1,\n20k x 1k x 400", cov["ours_vs_devinterp"], 1.0))
    return out


def render(data: list[Row], path: Path, *, title: str = "bif-pipeline against its targets") -> Path:
    """Draw ``data`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.62 * len(data) + 1.4))
    for y, row in enumerate(reversed(data)):
        ax.scatter(row.rounds, [y] * len(row.rounds), s=14, color="0.6", zorder=2)
        ax.scatter([row.value], [y], s=70, color="tab:green" if row.met else "tab:red", zorder=3)
        ax.plot([row.target, row.target], [y - 0.35, y + 0.35], color="black", lw=2, zorder=1)
        ax.annotate(f"{row.value:.2f}x", (row.value, y), xytext=(0, 9), textcoords="offset points", ha="center",
                    fontsize=8)
    ax.set_yticks(range(len(data)), [r.label for r in reversed(data)], fontsize=8)
    ax.set_xscale("log")
    values = [v for r in data for v in (r.value, r.target, *r.rounds)]
    ax.set_xlim(min(values) / 1.5, max(values) * 1.5)
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 1.5, 2, 3, 5) if min(values) / 1.5 <= t <= max(values) * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], ls="", marker="o", color="tab:green", label="the figure: meets its target"),
                       Line2D([], [], ls="", marker="o", color="tab:red", label="the figure: misses it"),
                       Line2D([], [], ls="", marker="o", ms=4, color="0.6", label="each round / run behind it"),
                       Line2D([], [], color="black", lw=2, label="target")],
              loc="upper left", fontsize=7, framealpha=0.9)
    ax.set_xlabel("ours / reference (log scale; left of the black bar meets the target)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load(path: str) -> dict | None:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=str(ROOT / "docs" / "benchmarks.json"), help="make bench's JSON")
    ap.add_argument("--scale", default=str(ROOT / "docs" / "benchmarks_scale.json"), help="benchmarks.scale's JSON")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.png"), help="where to write the PNG")
    args = ap.parse_args(argv)
    data = rows(_load(args.pipeline), _load(args.scale))
    if not data:
        ap.error(f"neither {args.pipeline} nor {args.scale} holds a benchmark figure; run `make bench` first")
    print(render(data, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
