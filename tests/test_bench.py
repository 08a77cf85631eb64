"""`make bench` (= `python -m benchmarks.pipeline`, README: Benchmarks) at its quick sizes, run as a command.

The figures themselves are never asserted as times (the targets are ratios measured by the command, not timed
tests). What is asserted: the command runs end to end, each ratio it reports is the quotient of the two times it
reports, the memory figures are consistent, the checks it runs pass, and its Markdown table has every row.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *only: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    args = [a for o in only for a in ("--only", o)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--quick", *args, "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_bench_covariance_and_out_of_core(tmp_path):
    data, table = _bench(tmp_path, "covariance", "ooc")
    cov, ooc = data["covariance"], data["out_of_core"]
    assert cov["shape"] == [400, 5000, 1000] and ooc["shape"] == [200, 10_000, 1000]
    assert cov["ratio_vs_gemm"] == pytest.approx(cov["dask_reduction_s"] / cov["gemm_s"])
    # the figures are the median of the timed reductions and the best of the GEMMs, every run kept
    assert cov["dask_reduction_s"] == pytest.approx(float(np.median(cov["dask_reduction_runs_s"])))
    assert len(cov["dask_reduction_runs_s"]) == 3 and cov["gemm_s"] == min(cov["gemm_runs_s"])
    assert ooc["reduce_wall_s"] == pytest.approx(float(np.median(ooc["reduce_runs_s"])))
    assert cov["center_plus_gemm_s"] >= cov["gemm_s"] > 0 and 0 < cov["ours_peak_rss_gb"] < 24
    if cov.get("devinterp_s") is not None:  # the optional baseline is installed (make install tries it)
        assert cov["ours_vs_devinterp"] == pytest.approx(cov["dask_reduction_s"] / cov["devinterp_s"])
    assert ooc["gates_passed"] is True and "0 failed" in ooc["gates_summary"]
    assert ooc["ratio_vs_gemm_limit"] == pytest.approx(ooc["reduce_wall_s"] / ooc["gemm_limit_s"])
    assert ooc["gemm_limit_s"] == pytest.approx(2.0 * 200 * 10_000 * 1000 / (ooc["gemm_gflops"] * 1e9))
    # summed PSS: the idle processes are part of the peak; the peak with the checks includes the reduction's
    assert ooc["peak_rss_gb"] >= ooc["idle_processes_rss_gb"] > 0
    assert ooc["peak_rss_incl_gates_diagnostics_gb"] >= ooc["peak_rss_gb"]
    # bif.zarr holds two float32 (train x query) arrays of noisy values, which barely compress (1.11x their raw size
    # with the top-k at 100k x 1k)
    assert ooc["output_bytes"] >= 0.9 * 2 * 4 * 10_000 * 1000
    assert ooc["devinterp_full_cov_gb_needed"] == pytest.approx(4 * 11_000 ** 2 / 2**30)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert sum(r.startswith("| covariance") for r in rows) == 2
    assert sum(r.startswith("| out of core") for r in rows) == 4
    # the machine's fresh memory, probed before each part (benchmarks/machine.py), is one row of the table
    from benchmarks.machine import describe_parts, free_page_reporting

    probe, before = data["machine"]["memory"], data["machine"]["memory_before"]
    assert list(before) == ["covariance", "out of core"] and before["covariance"] == probe  # the first is the run's
    for p in before.values():
        assert p["fill_mib"] == 160 and p["idle_s"] == 2.5
        assert 0 < p["fill_hot_ms"] <= p["fill_first_ms"] and p["fill_after_idle_ms"] > 0
        assert p["after_idle_vs_hot"] == pytest.approx(p["fill_after_idle_ms"] / p["fill_hot_ms"])
        assert p["free_page_reporting"] == free_page_reporting()
    assert [r for r in rows if r.startswith("| machine")] == [f"| machine: fresh memory (not a target) | "
                                                             f"{describe_parts(data['machine'])} | - | yes |"]
    # `python -m benchmarks.plot` (make bench's second step) draws what the JSON holds; no scale JSON: its rows are
    # left out, and the devinterp row only when the optional baseline ran
    png = tmp_path / "bench.png"
    res = subprocess.run([sys.executable, "-m", "benchmarks.plot", "--pipeline", str(tmp_path / "bench.json"),
                          "--scale", str(tmp_path / "none.json"), "--out", str(png)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from benchmarks.plot import rows as plot_rows

    plotted = plot_rows(data, None)
    assert [r.value for r in plotted] == [cov["ratio_vs_gemm"]] + ([cov["ours_vs_devinterp"]] if cov.get("devinterp_s")
                                                                  else [])
    assert plotted[0].rounds == pytest.approx([t / cov["gemm_s"] for t in cov["dask_reduction_runs_s"]])


@pytest.mark.slow
def test_bench_sampler_runs_bif_run_as_typed_against_the_bare_loops(tmp_path):
    """The sampler part at 100 draws, one round: six `bif run` commands (fresh Prefect homes, the kept server and
    cluster, the warm process, BIF_WARM=0, a cluster of its own) and the bare loops (~2 min)."""
    data, table = _bench(tmp_path, "sampler")
    s = data["sampler"]
    assert s["repeats"] == 1 and len(s["runs"]) == 1 and s["draws_per_chain"] == 100
    (r,) = s["runs"]
    assert s["warm_copies"] == 1  # the round ran as a copy of the warm bif process the cold run started
    assert r["per_draw_ratio"] == pytest.approx(r["ours_per_draw_s"] / r["bare_per_draw_2_parallel_s"])
    same_ops = r["bare_per_draw_2_parallel_same_ops_s"]
    assert r["per_draw_ratio_same_ops"] == pytest.approx(r["ours_per_draw_s"] / same_ops)
    assert r["whole_run_ratio"] == pytest.approx(r["wall_s"] / (2 * 100 * r["bare_per_draw_alone_s"]))
    assert 0 < r["startup_s"] < r["wall_s"] and r["sampling_s"] > 0
    assert 0 < s["startup_s"] < s["startup_fresh_prefect_home_s"]
    assert sum(line.startswith("| sampler") for line in table.splitlines()) == 4
    from benchmarks.plot import rows as plot_rows

    plotted = plot_rows(data, None)  # the sampler's three ratios, each with its one round
    assert [(r.value, r.rounds, r.target) for r in plotted] == [
        (s["whole_run_ratio_vs_bare_2_chains_sequential"], [r["whole_run_ratio"]], 2.0),
        (s["per_draw_ratio_vs_bare_same_parallelism"], [r["per_draw_ratio"]], 1.1),
        (s["per_draw_ratio_vs_bare_same_ops_same_parallelism"], [r["per_draw_ratio_same_ops"]], 1.1)]


def test_plot_rows_are_the_reported_figures_and_their_runs():
    """benchmarks.plot: each row is the figure its benchmark reports, its runs as ratios of the same kind, and
    'met' is the target's comparison (ratios exactly at a target meet it, as in the benchmarks' tables)."""
    from benchmarks.plot import rows

    scale = {"checks": {"gates_over_reduction": 2.0, "gates_over_reduction_rounds": [1.5, 2.5, 2.0],
                        "diagnostics_over_reduction": 2.01, "diagnostics_over_reduction_rounds": [2.01]},
             "limit_100k": {"ratio_vs_limit": 0.5, "limit_s": 2.0, "stage_runs_s": [1.0, 0.8, 1.2]},
             "limit_20k": {"ratio_vs_gemm64": 1.5, "gemm64_s": 0.2, "stage_runs_s": [0.3, 0.28]},
             "scale": {"stage_peak_rss_gb": 2.5}}
    pipeline = {"covariance": {"devinterp_s": 4.0, "ours_vs_devinterp": 0.1, "ratio_vs_gemm": 2.5, "gemm_s": 0.2,
                               "dask_reduction_runs_s": [0.6, 0.5, 0.4]}}
    got = {r.label.split(",")[0].split("\n")[0]: r for r in rows(pipeline, scale)}
    assert [(r.value, r.target, r.met) for r in got.values()] == [
        (2.0, 2.0, True), (2.01, 2.0, False), (0.5, 2.0, True), (1.5, 2.0, True), (2.5, 2.0, False),
        (1.25, 1.0, False), (0.1, 1.0, True)]
    assert got["4: the same in make bench"].rounds == pytest.approx([3.0, 2.5, 2.0])
    assert got["4: covariance stage / its limit"].rounds == pytest.approx([0.5, 0.4, 0.6])
    assert got["4: covariance stage / float64 GEMM"].rounds == pytest.approx([1.5, 1.4])
    assert rows(None, None) == [] and rows({"covariance": {"devinterp_s": None, "ratio_vs_gemm": None}}, {}) == []


@pytest.mark.slow
def test_backfill_benchmark_reports_its_sweeps_single_runs_and_bare_loops(tmp_path):
    """`python -m benchmarks.backfill --quick` (README: Benchmarks): 2 checkpoints, one round. Each ratio is the
    quotient of the times it reports; the sweep recorded both runs in its catalog (~1 min)."""
    out = tmp_path / "backfill.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "BIF_KEEP_CLUSTER", "BIF_WARM")}
    res = subprocess.run([sys.executable, "-m", "benchmarks.backfill", "--quick", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["checkpoints"], r["draws_per_chain"], r["chains"], r["repeats"]) == (2, 100, 2, 1)
    (row,) = r["rounds"]
    assert len(row["singles_s"]) == len(row["bare_s"]) == len(row["backfill_mc1_runs_s"]) == 2
    assert all(t > 0 for t in row["singles_s"] + row["bare_s"] + row["backfill_mc1_runs_s"])
    assert r["bare_s"] == pytest.approx(sum(row["bare_s"])) and r["singles_s"] == pytest.approx(sum(row["singles_s"]))
    assert r["backfill_mc1_vs_bare"] == pytest.approx(row["backfill_mc1_s"] / sum(row["bare_s"]))
    assert r["backfill_mc1_vs_singles"] == pytest.approx(row["backfill_mc1_s"] / sum(row["singles_s"]))
    assert r["backfill_mc1_per_checkpoint_s"] == pytest.approx(row["backfill_mc1_s"] / 2)
    assert r["backfill_mc1_overhead_s"] == pytest.approx(row["backfill_mc1_s"] - sum(row["backfill_mc1_runs_s"]))
    assert 0 < r["backfill_mc1_overhead_s"] < row["backfill_mc1_s"]
    assert "`bif backfill --max-concurrent 1`" in res.stdout and "the bare loop" in res.stdout


def test_machine_probe_reads_the_balloons_features_and_times_new_arrays(tmp_path):
    """benchmarks/machine.py: free page reporting is on only for a bound virtio-balloon device whose feature bit 5
    (VIRTIO_BALLOON_F_REPORTING) is set, with blocks of 4 KiB << page_reporting_order; the probe's ratio is its
    two fills' quotient; its line warns when memory after an idle gap is 5x slower or more."""
    from benchmarks.machine import PartProbes, describe, describe_parts, free_page_reporting, memory_probe

    balloon, order = tmp_path / "virtio_balloon", tmp_path / "page_reporting_order"
    assert free_page_reporting(balloon, order) is None  # no balloon driver
    dev = balloon / "virtio3"
    dev.mkdir(parents=True)
    (dev / "features").write_text("0110010000000000\n")  # stats queue, deflate on OOM, free page reporting
    order.write_text("9\n")
    assert free_page_reporting(balloon, order) == {"device": "virtio3", "order": 9, "block_mib": 2.0}
    order.write_text("10\n")
    assert free_page_reporting(balloon, order)["block_mib"] == 4.0
    (dev / "features").write_text("0110000000000000\n")  # a balloon without free page reporting
    assert free_page_reporting(balloon, order) is None

    probe = memory_probe(mib=8, idle_s=0.1)
    assert probe["fill_mib"] == 8 and probe["idle_s"] == 0.1
    assert 0 < probe["fill_hot_ms"] <= probe["fill_first_ms"]
    assert probe["after_idle_vs_hot"] == pytest.approx(probe["fill_after_idle_ms"] / probe["fill_hot_ms"])
    quiet = probe | {"fill_hot_ms": 20.0, "fill_after_idle_ms": 24.0, "after_idle_vs_hot": 1.2,
                     "free_page_reporting": {"device": "virtio0", "order": 9, "block_mib": 2.0}}
    assert describe(quiet).startswith("8 MiB of new numpy arrays filled in 20 ms, 24 ms after 0.1 s idle (1x; "
                                      "free page reporting on (virtio0, 2 MiB blocks)")
    assert "inflated" not in describe(quiet)
    cold = quiet | {"fill_after_idle_ms": 1290.0, "after_idle_vs_hot": 64.5}
    assert describe(cold).endswith("a timing that allocates after an idle gap is inflated here (benchmarks/machine.py)")

    # one probe before each part: the first is the run's; a part probed at a cold minute is named, and warned of
    machine: dict = {}
    said: list[str] = []
    probes = PartProbes(machine, idle_s=0.05, say=said.append)
    first, second = probes.before("sampler"), probes.before("covariance")
    assert said == [f"machine: how its fresh memory behaves before the {part} part (benchmarks/machine.py)"
                    for part in ("sampler", "covariance")]
    assert machine["memory"] is first and machine["memory_before"] == {"sampler": first, "covariance": second}
    assert first["idle_s"] == second["idle_s"] == 0.05 and second["fill_hot_ms"] > 0
    line = describe_parts({"memory": quiet, "memory_before": {"sampler": quiet, "covariance": cold}})
    assert line.startswith(describe(quiet)) and "before each part: sampler 1.2x, covariance 64.5x" in line
    assert line.endswith("is inflated in that part (benchmarks/machine.py)")
    assert "inflated" not in describe_parts({"memory": quiet, "memory_before": {"sampler": quiet}})
