"""Every command the README shows, run as a user types it: a subprocess of the `bif` console
script, with no PREFECT_API_URL (so each command starts its own local Prefect server) and a
PREFECT_HOME that is not the test session's (tests/conftest.py: user_prefect_home). Small settings keep
it quick; each test asserts the exit code and values. `bif lds` and `bif calibrate` write to S3 (moto)
with a marker secret and also get the credentials check of tests/test_credentials.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bif import schema as S
from conftest import shadowing_file
from leak_check import assert_no_leak

pytestmark = pytest.mark.e2e

BIF = str(Path(sys.executable).parent / "bif")
REPO = Path(__file__).resolve().parents[1]
NOISE = ("| INFO", "FutureWarning", "Created temporary directory", "Traceback")


def user_env(prefect_home: Path) -> dict[str, str]:
    """The environment of a user's shell: no Prefect API, a Prefect home of their own, our code on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "BIF_QUIET_TERMINAL")
           and not k.startswith("PREFECT_LOGGING_")}
    env["PREFECT_HOME"] = str(prefect_home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def bif(*args: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([BIF, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_quiet(res: subprocess.CompletedProcess) -> None:
    both = res.stdout + res.stderr
    for word in NOISE:
        assert word not in both, f"{word!r} on the terminal:\n{both}"


@pytest.fixture(scope="module")
def home(tmp_path_factory, user_prefect_home) -> dict:
    """A user's working directory with the example config where the README says, and their environment.

    The kept Dask cluster is on, as in a user's shell (the suite turns it off elsewhere, tests/conftest.py): the
    commands on the logistic config run from this directory with this environment, so they share one cluster, as a
    user's do (the first starts it; tests/test_kept_cluster.py checks the sharing itself). It is stopped when the
    file is done. The digits run (:func:`digits_run`) starts a cluster of its own."""
    from bif.flows import kept_cluster

    cwd = tmp_path_factory.mktemp("user")
    (cwd / "bif" / "examples").mkdir(parents=True)
    shutil.copy(REPO / "bif" / "examples" / "digits.yaml", cwd / "bif" / "examples" / "digits.yaml")
    env = {k: v for k, v in user_env(user_prefect_home).items() if not k.startswith("AWS_")}  # S3: in the configs
    yield {"cwd": cwd, "env": env | {kept_cluster.KEEP_ENV: "1"}}
    kept_cluster.stop(user_prefect_home)


@pytest.fixture(scope="module")
def digits_run(home) -> dict:
    """`bif example digits runs/example/digits.pt` then `bif run bif/examples/digits.yaml` (small), on a cluster of
    its own: on the kept cluster, the logistic commands after it would replace that (another example's module)."""
    from bif.flows.kept_cluster import KEEP_ENV

    cwd, env = home["cwd"], home["env"] | {KEEP_ENV: "0"}
    ex = bif("example", "digits", "runs/example/digits.pt", "--epochs", "30", cwd=cwd, env=env)
    run = bif("run", "bif/examples/digits.yaml", "--set", "problem_args.n_train=200",
              "--set", "problem_args.n_query=12", "--set", "sampler.num_chains=2", "--set", "sampler.num_draws=60",
              "--set", "sampler.num_burnin_steps=10", "--set", "sampler.draws_per_block=30",
              "--set", "quality.allow_warnings=true", cwd=cwd, env=env)
    return {"example": ex, "run": run, "out": cwd / "runs" / "example" / "digits"}


def test_example_writes_a_loadable_checkpoint(home, digits_run):
    import torch

    from bif.examples.digits import build

    ex = digits_run["example"]
    assert ex.returncode == 0, ex.stderr
    assert "wrote digits checkpoint to runs/example/digits.pt" in ex.stdout
    state = torch.load(home["cwd"] / "runs" / "example" / "digits.pt", weights_only=True)
    assert set(state) == set(build(n_train=10).model.state_dict())


def test_run_prints_a_short_summary_and_logs_to_a_file(digits_run):
    res, out = digits_run["run"], digits_run["out"]
    assert res.returncode == 0, res.stdout + res.stderr
    assert_quiet(res)
    # the progress bars go to stderr, so `bif run ... > out.txt` gets just the summary
    bars = [ln for ln in res.stderr.splitlines() if ln.startswith(("chain ", "covariance blocks"))]
    assert len(bars) == 3 and all("60/60" in b for b in bars[:2]), res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert not any(ln.startswith(("chain ", "covariance blocks")) for ln in lines), res.stdout
    assert lines[0] == "status: complete   output: runs/example/digits", res.stdout
    assert "sampler: nβ=200 (= n_train)  γ=170  ε=0.00035  device=cpu" in lines
    assert "bif show runs/example/digits --query 0" in res.stdout
    manifest = json.loads((out / S.MANIFEST_FILE).read_text())
    assert manifest["status"] == "complete"
    assert manifest["resolved"] == {"nbeta": 200.0, "gamma": 170.0, "step_size": 0.00035, "device": "cpu",
                                    "n_train": 200, "n_query": 12}
    # durations, not clock times: every stage is positive and they add up to less than the wall time
    time_line = next(ln for ln in lines if ln.startswith("time: "))
    total = float(re.match(r"time: ([\d.]+)s = ", time_line).group(1))
    stages = {k: float(v) for k, v in (re.fullmatch(r"(.+) ([\d.]+)s", part).groups()
                                       for part in time_line.split(" = ", 1)[1].split(", "))}
    assert set(stages) >= {"server+cluster start", "prepare", "sampling", "covariance", "gates+diagnostics"}
    t = manifest["timings"]  # the gates ran after the covariance; the diagnostics began beside it and ended by the
    assert 0 < t["gates_s"] <= t["checks_s"]  # gates' end or after it
    assert 0 < t["diagnostics_s"] <= t["covariance_s"] + t["checks_s"]
    assert all(0 < v < total for v in stages.values()), time_line
    assert sum(stages.values()) <= total
    assert stages["server+cluster start"] == pytest.approx(manifest["timings"]["cluster_startup_s"], abs=0.06)
    gates = next(ln for ln in lines if ln.startswith("gates: "))
    assert gates.startswith("gates: passed (") or "warnings" in gates
    d = manifest["diagnostics"]
    assert f"R-hat: max {d['rhat']['max']:.3f}" in res.stdout
    assert f"ESS bulk: median {d['ess_bulk']['q50']:.0f}" in res.stdout
    assert len(lines) <= 8, res.stdout
    # the logs went to a file in the output, task runs from the Dask workers included
    (log,) = (out / "logs").glob("run-*.log")
    text = log.read_text()
    for name in ("sample-chain-0", "sample-chain-1", "reduce-covariance", "Beginning flow run"):
        assert name in text, text
    assert "resolved: nbeta=200.0" in text


def test_show_lists_the_top_k_train_ids(home, digits_run):
    res = bif("show", "runs/example/digits", "--query", "3", cwd=home["cwd"], env=home["env"])
    assert res.returncode == 0, res.stderr
    topk = pd.read_parquet(digits_run["out"] / S.TOPK_FILE)
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in res.stdout.splitlines() if ln.count("│") == 5]
    rows = [r for r in rows if r[0].isdigit()]
    assert len(rows) == 20  # 10 positive then 10 negative
    for direction, block in (("positive", rows[:10]), ("negative", rows[10:])):
        want = topk[(topk[S.QUERY] == 3) & (topk[S.DIRECTION] == direction)].sort_values(S.RANK).head(10)
        assert [int(r[1]) for r in block] == want[S.TRAIN].tolist()
        assert np.allclose([float(r[2]) for r in block], want[S.BIF], rtol=1e-3)
    assert "query 3: train examples whose upweighting would raise its loss" in " ".join(res.stdout.split())
    # a reader that closes the pipe early (`bif show ... | head`): exit 0, as `bif keys | head -1` (rich's own
    # default exits 1)
    r, w = os.pipe()
    os.close(r)
    try:
        closed = subprocess.run([BIF, "show", "runs/example/digits", "--query", "3"], cwd=home["cwd"],
                                env=home["env"], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert closed.returncode == 0 and closed.stderr == "", closed.stderr


def test_report_regenerates_the_html(home, digits_run):
    html = digits_run["out"] / "report.html"
    before = html.stat().st_mtime_ns
    res = bif("report", "runs/example/digits", cwd=home["cwd"], env=home["env"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("report.html")
    assert html.stat().st_mtime_ns > before
    text = html.read_text()
    assert text.startswith("<!") and "</html>" in text


def test_keys_help_and_errors(home, tmp_path):
    keys = bif("keys", cwd=home["cwd"], env=home["env"])
    assert keys.returncode == 0
    line = next(ln for ln in keys.stdout.splitlines() if ln.strip().startswith("step_size:"))
    assert "#" in line
    top = bif("--help", cwd=home["cwd"], env=home["env"])
    assert top.returncode == 0
    for cmd in ("run", "show", "report", "keys", "example", "lds", "calibrate", "compare"):
        assert re.search(rf"^\s+{cmd}\s", top.stdout, re.M), cmd
    run_help = bif("run", "--help", cwd=home["cwd"], env=home["env"])
    assert run_help.returncode == 0 and "--verbose" in run_help.stdout and "--set KEY=VALUE" in run_help.stdout


def readme_block(language: str, first_line: str) -> str:
    """The README's fenced ``language`` block whose first line is ``first_line``."""
    text = (REPO / "README.md").read_text()
    for block in re.findall(rf"^```{language}\n(.*?)^```$", text, re.M | re.S):
        if block.startswith(first_line + "\n") or block.startswith(first_line + ":"):
            return block
    raise AssertionError(f"no ```{language} block starting {first_line!r} in README.md")


def test_the_readme_problem_from_scratch_runs_from_its_directory(tmp_path, user_prefect_home):
    """README "From scratch": my_problem.py and my_config.yaml as the README gives them, in a directory of their
    own, nothing on PYTHONPATH for it; `bif run my_config.yaml` and `bif show` as typed (a smaller sampler appended),
    on a cluster of the command's own, whose workers import my_problem too. `bif run` imports a module of the
    working directory as `python -m` does (it failed with "No module named 'my_problem'"), after everything else on
    sys.path: a yaml.py beside it does not take PyYAML's place, nor a socket.py the standard module's in the
    cluster's forkserver, which Python starts as `python -c` with the directory first on its sys.path."""
    (tmp_path / "my_problem.py").write_text(readme_block("python", "# my_problem.py"))
    (tmp_path / "my_config.yaml").write_text(readme_block("yaml", "# my_config.yaml"))
    (tmp_path / "yaml.py").write_text(shadowing_file("yaml"))
    # a module the forkserver imports before it takes the command's sys.path (multiprocessing.forkserver's own)
    (tmp_path / "socket.py").write_text(shadowing_file("socket"))
    env = user_env(user_prefect_home) | {"BIF_KEEP_CLUSTER": "0"}  # the commands' own cluster (the kept one's
    assert str(tmp_path) not in env["PYTHONPATH"].split(os.pathsep)  # workers: tests/test_kept_cluster.py)
    small = ("--set", "sampler.num_chains=2", "--set", "sampler.num_draws=40", "--set", "sampler.num_burnin_steps=10")
    res = bif("run", "my_config.yaml", *small, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "status: complete   output: runs/my_problem" in res.stdout.splitlines(), res.stdout
    manifest = json.loads((tmp_path / "runs" / "my_problem" / S.MANIFEST_FILE).read_text())
    assert manifest["status"] == "complete" and manifest["resolved"]["n_train"] == 500
    assert manifest["resolved"]["n_query"] == 69
    show = bif("show", "runs/my_problem", "--query", "0", cwd=tmp_path, env=env)
    assert show.returncode == 0 and "query 0" in show.stdout, show.stdout + show.stderr
    topk = pd.read_parquet(tmp_path / "runs" / "my_problem" / S.TOPK_FILE)
    assert set(topk[topk[S.QUERY] == 0][S.TRAIN]) <= set(range(500))
    missing = bif("run", "my_config.yaml", "--set", "problem=nosuchmodule:build", "--output", "runs/none",
                  cwd=tmp_path, env=env)
    assert missing.returncode == 2
    assert "the module is in the working directory, installed, or on PYTHONPATH" in missing.stderr, missing.stderr


def test_closed_stdout_exits_quietly(home):
    """`bif keys | head -1`: a reader that closes the pipe early gets no BrokenPipeError traceback."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before bif writes: every write to stdout fails with EPIPE
    try:
        res = subprocess.run([BIF, "keys"], cwd=home["cwd"], env=home["env"], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(w)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    with subprocess.Popen(f'"{BIF}" keys | head -1', shell=True, cwd=home["cwd"], env=home["env"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        out, err = p.communicate(timeout=120)
    assert out.startswith("problem:") and len(out.splitlines()) == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def logistic_cfg(home) -> str:
    cfg = {"problem": "bif.examples.logistic:build", "problem_args": {"n": 40, "n_query": 6}, "output": "runs/logistic",
           "sampler": {"num_chains": 2, "num_draws": 60, "num_burnin_steps": 20, "steps_per_draw": 2,
                       "step_size": 1e-2, "gamma": 10.0, "batch_size": 40},
           "compute": {"n_workers": 2}}
    (home["cwd"] / "logistic.yaml").write_text(yaml.safe_dump(cfg))
    return "logistic.yaml"


def scheduler_imported(home: dict, *modules: str) -> list[str]:
    """Which of ``modules`` the scheduler of the user's kept cluster has imported."""
    from distributed import Client

    from bif.flows import kept_cluster

    with Client(kept_cluster.status(Path(home["env"]["PREFECT_HOME"])).address, set_as_default=False) as client:
        return client.run_on_scheduler(lambda: [m for m in modules if m in sys.modules])


def s3_command(home: dict, s3_bucket: tuple[str, dict], cfg: str,
               *args: str) -> tuple[subprocess.CompletedProcess, Path, str]:
    """Run `bif <args[0]> <bucket>/cfg.yaml <args[1:]>` from the user's directory on the logistic config, its output
    on S3 (moto) with the marker secret in ``storage_options``; returns (result, that dir, bucket)."""
    bucket, opts = s3_bucket
    data = yaml.safe_load((home["cwd"] / cfg).read_text())
    data |= {"output": f"s3://{bucket}/logistic", "storage_options": opts}
    (home["cwd"] / bucket).mkdir()
    (home["cwd"] / bucket / "cfg.yaml").write_text(yaml.safe_dump(data))
    return bif(args[0], f"{bucket}/cfg.yaml", *args[1:], cwd=home["cwd"], env=home["env"]), home["cwd"], bucket


def test_lds_prints_the_lds_of_every_method(home, logistic_cfg, s3_bucket):
    """`bif lds` (here with -v, which adds the logs; `bif run` and `bif calibrate` check the quiet default),
    writing to S3 with a marker secret that must leak nowhere (the credentials policy, as in test_credentials)."""
    res, work, bucket = s3_command(home, s3_bucket, logistic_cfg, "lds", "-v", "--num-subsets", "6",
                                   "--num-seeds", "1", "--methods", "bif,graddot")
    assert res.returncode == 0, res.stdout + res.stderr
    both = res.stdout + res.stderr
    assert "| INFO" in both and "Traceback" not in both, both
    assert "bif-lds" in both and ("Beginning flow run" in both or "Finished in state" in both), both
    printed = {m: (float(v), float(e)) for m, v, e in
               re.findall(r"^\s+(\w+)\s+LDS ([+-][\d.]+) ± ([\d.]+)", res.stdout, re.M)}
    assert set(printed) == {"bif", "bif_corr", "graddot"}
    # no marker on the terminal (the -v logs included), in Prefect's database, the bucket, local files;
    # the flow's log file is in the bucket (logs/lds-*.log) and holds the flow run's logs
    objects = assert_no_leak(res, Path(home["env"]["PREFECT_HOME"]), work, bucket, s3_bucket[1], "bif-lds", "lds")
    summary_uri = re.search(r"^summary: (\S+)", res.stdout, re.M).group(1)
    assert summary_uri.startswith(f"s3://{bucket}/logistic/") and summary_uri.endswith("/results/latest/summary.json")
    summary = json.loads(objects[summary_uri.removeprefix("s3://")])
    for r in summary["methods"]:
        assert printed[r["method"]] == pytest.approx((r["lds"], r["stderr"]), abs=6e-4)
        assert -1 <= r["lds"] <= 1
    assert summary["num_retrained"] == 6
    assert sum("/retrain/" in p for p in objects) == 6  # the retrainings wrote to S3
    # the kept cluster's scheduler unpickled the tasks without importing torch or scipy (bif.flows.lds imports what
    # needs them in its functions): they cost a new cluster's first `bif lds` 1.4 s (16.9 -> 15.5 s, 2026-12-04)
    assert scheduler_imported(home, "torch", "scipy") == []


def test_lds_and_calibrate_bad_settings_exit_2_with_a_message(home, logistic_cfg):
    lds = bif("lds", logistic_cfg, "--num-subsets", "1", cwd=home["cwd"], env=home["env"])
    assert lds.returncode == 2 and "Traceback" not in lds.stderr
    assert "--num-subsets = 1" in lds.stderr and "greater than or equal to 2" in lds.stderr
    cal = bif("calibrate", logistic_cfg, "--num-chains", "1", cwd=home["cwd"], env=home["env"])
    assert cal.returncode == 2 and "Traceback" not in cal.stderr and "--num-chains = 1" in cal.stderr
    meth = bif("lds", logistic_cfg, "--methods", "bif,nope", cwd=home["cwd"], env=home["env"])
    assert meth.returncode == 2 and "'nope'" in meth.stderr and "Traceback" not in meth.stderr


def test_an_error_inside_a_flow_is_one_line_and_its_traceback_goes_to_the_run_log(home, logistic_cfg, tmp_path):
    """A domain error raised inside the flow (a chain that diverges; a checkpoint the LDS flow cannot find) is the
    command's one-line message and exit 2, not Prefect's ERROR record and traceback on the terminal (found
    running them as typed); the traceback is kept in <output>/logs/. `-v` still shows it."""
    out = tmp_path / "diverged"
    run = bif("run", logistic_cfg, "--set", "sampler.step_size=1e6", "--output", str(out), "--no-progress",
              cwd=home["cwd"], env=home["env"])
    assert run.returncode == 2 and re.search(r"^error: chain \d diverged", run.stderr, re.M), run.stderr
    assert_quiet(run)
    logs = list((out / "logs").glob("run-*.log"))
    assert logs and "ChainDivergedError" in logs[0].read_text() and "Traceback" in logs[0].read_text()
    lds = bif("lds", logistic_cfg, "--set", f"checkpoint={tmp_path / 'missing.pt'}", "--num-subsets", "2",
              "--num-seeds", "1", "--output", str(tmp_path / "lds"), cwd=home["cwd"], env=home["env"])
    assert lds.returncode == 2 and "missing.pt' does not exist" in lds.stderr, lds.stderr
    assert_quiet(lds)
    verbose = bif("run", logistic_cfg, "--set", "sampler.step_size=1e6", "--output", str(tmp_path / "v"),
                  "--no-progress", "-v", cwd=home["cwd"], env=home["env"])
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_calibrate_writes_a_sampler_block(home, logistic_cfg, s3_bucket):
    """`bif calibrate --quick`, writing to S3 with a marker secret that must leak nowhere (as in test_credentials)."""
    from bif.config import SamplerConfig

    res, work, bucket = s3_command(home, s3_bucket, logistic_cfg, "calibrate", "--quick", "--num-subsets",
                                   "6", "--num-draws", "20", "--pilot-steps", "20", "--budget-seconds", "900")
    assert res.returncode == 0, res.stdout + res.stderr
    assert_quiet(res)
    # no marker on the terminal, in Prefect's database, the bucket, local files; logs/calibrate-*.log is in the bucket
    objects = assert_no_leak(res, Path(home["env"]["PREFECT_HOME"]), work, bucket, s3_bucket[1], "bif-calibrate",
                             "calibrate")
    out = f"{bucket}/logistic/calibration"
    block = yaml.safe_load(objects[f"{out}/sampler.yaml"])["sampler"]
    printed = yaml.safe_load(res.stdout.split("outputs:")[0])["sampler"]
    assert printed == block
    assert {"step_size", "nbeta", "gamma", "batch_size", "num_chains", "num_draws"} <= set(block)
    s = SamplerConfig(**block)
    scores = json.loads(objects[f"{out}/scores.json"])
    assert s.step_size == pytest.approx(scores["recommended"]["step_size"], rel=1e-3)
    assert s.nbeta == pytest.approx(scores["recommended"]["nbeta"], rel=1e-3) and s.gamma > 0
    assert s.num_draws == scores["num_draws"] and s.num_chains == 4
    # --quick: a 2 x 2 round 0 (nbeta n, 10n x damping 0.01, 0.1) at 20 draws, then round 1 at 60
    r0 = [r for r in scores["scores"] if r["round"] == 0]
    assert {(r["mult"], r["lam"]) for r in r0} == {(1.0, 0.01), (1.0, 0.1), (10.0, 0.01), (10.0, 0.1)}
    assert {r["num_draws"] for r in r0} == {20}
    assert scores["recommended"]["round"] == 1 and scores["recommended"]["num_draws"] == 60
    assert re.search(r"^spent \d+ s of a \d+ s budget", res.stdout, re.M), res.stdout
    assert len(objects[f"{out}/search.png"]) > 5000
    # nor for calibration, whose tasks take a calibrate.Job and an lds.GroundTruth (18.7 -> 16.0 s, 2026-12-04)
    assert scheduler_imported(home, "torch", "scipy") == []


@pytest.mark.slow  # ~60-115 s: a benchmark (retrainings, a damping grid, 4 BIF chains), even this small
def test_compare_writes_the_table(home):
    docs = home["cwd"] / "docs"
    res = bif("compare", "--sizes", "60", "--num-subsets", "4", "--num-seeds", "1", "--bif-draws", "40",
              "--skip-optional", "--cache", "runs/lds_bench", "--docs", "docs", cwd=home["cwd"], env=home["env"])
    assert res.returncode == 0, res.stdout + res.stderr
    table = (docs / "lds_table.md").read_text()
    assert "| n_train | BIF | BIF (corr) | IF (exact, damped) | GradDot | GradCos |" in table
    data = json.loads((docs / "lds_table.json").read_text())
    (row,) = data["rows"]
    assert row["n_train"] == 60 and set(row["methods"]) == {"bif", "bif_corr", "influence", "graddot", "gradcos"}
    assert f"| 60 | **{row['methods']['bif']['lds']:.3f}**" in table
    assert (docs / "lds_vs_n.png").stat().st_size > 5000


def test_ctrl_c_that_another_error_wraps_still_exits_130(monkeypatch, capsys):
    """Ctrl-C can land in code that turns the KeyboardInterrupt into another error (pydantic's serializer in
    Prefect's engine did: exit 1 and a traceback). The command still says "interrupted" and exits 130; the same
    error without a Ctrl-C is exit 1 with its traceback, and the SIGINT handler is Python's again afterwards."""
    import argparse
    import signal
    import time

    from bif.flows import cli

    def command(args):
        try:
            if args.interrupt:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise RuntimeError("the serializer wrapped it") from err

    parser = argparse.ArgumentParser()
    parser.add_argument("--interrupt", action="store_true")
    parser.set_defaults(func=command)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    # Python's own handler, as an interactive shell starts the suite with it (a suite started in the background by a
    # shell without job control, e.g. `nohup make test &`, inherits SIGINT ignored, and Python then keeps it ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["--interrupt"]) == 130
        err = capsys.readouterr().err
        assert "interrupted" in err and "Traceback" not in err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert cli.main([]) == 1
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "RuntimeError: the serializer wrapped it" in capsys.readouterr().err


def test_every_option_a_commands_help_names_is_one_of_its_options():
    """Every command's --help says what it does and what each argument is (`bif show`, `example`, `keys` and
    `compare` printed bare usage), and names only options it has (`bif calibrate --help` described
    --budget-retrainings, which it did not have)."""
    import argparse

    from bif.flows.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) >= 10
    for name, parser in sub.choices.items():
        assert len(parser.description or "") > 40 and "``" not in parser.description, name
        assert all(a.help for a in parser._actions), (name, [a.dest for a in parser._actions if not a.help])
        have = {o for a in parser._actions for o in a.option_strings}
        text = " ".join([parser.description or "", parser.epilog or "", *(a.help or "" for a in parser._actions)])
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
        assert named <= have, (name, sorted(named - have))
