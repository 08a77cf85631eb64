"""Operations (flows/backfill.py, flows/cli_ops.py): backfill / watch sweeps over many checkpoints as
Prefect subflows on one Dask cluster, a corrupt checkpoint recorded as failed while the others
complete, a second sweep doing only what is left, a sweep on moto's S3, and the CLI as typed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from bif import schema as S
from bif.config import build_config
from bif.store.catalog import Catalog, file_sha256, make_run_id, sweep_config_hash
from bif.store.manifest import read_manifest

pytestmark = pytest.mark.e2e

LINEAR_ARGS = {"n": 24, "d": 3, "m": 4, "seed": 2}
SAMPLER = {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 20, "steps_per_draw": 2, "step_size": 2e-3,
           "gamma": 10.0, "nbeta": 24.0, "batch_size": 24, "seed": 3, "draws_per_block": 20}


def sweep_data(output: str, compute: dict | None = None) -> dict:
    return {"problem": "bif.examples.linear:build", "problem_args": LINEAR_ARGS, "output": output,
            "sampler": SAMPLER, "covariance": {"train_block_size": 16, "query_block_size": 4, "topk": 3},
            "compute": compute or {"n_workers": 2}}


def make_checkpoints(folder: str, n: int, *, storage_options: dict | None = None) -> list[str]:
    """``n`` checkpoints of the linear example along a made-up training path (w* + shrinking offsets)."""
    import fsspec

    from bif.examples.linear import build

    model = build(**LINEAR_ARGS).model
    uris = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        state = {"weight": model.weight.detach() + 0.05 * (n - k) * torch.randn(model.weight.shape, generator=g,
                                                                               dtype=model.weight.dtype)}
        uri = f"{folder}/step-{k:03d}.pt"
        with fsspec.open(uri, "wb", **(storage_options or {})) as f:
            torch.save(state, f)
        uris.append(uri)
    return uris


def public(data: dict) -> dict:
    return build_config(data).public_dict() | {"storage_options": {}}


def test_backfill_records_a_corrupt_checkpoint_as_failed_and_completes_the_others(tmp_path, prefect_api_url,
                                                                                  dask_address):
    from bif.flows.backfill import backfill_flow, listen

    ckpts = make_checkpoints(str(tmp_path / "ckpts"), 2)
    bad = tmp_path / "ckpts" / "step-999.pt"
    bad.write_bytes(b"this is not a torch checkpoint")
    out = str(tmp_path / "sweep")
    data = sweep_data(out, {"address": dask_address})
    events: list[tuple[str, str]] = []
    with listen(lambda rid, uri, state: events.append((Path(uri).name, state))) as ref:
        res = backfill_flow(config=public(data), checkpoints=str(tmp_path / "ckpts" / "*.pt"), max_concurrent=2,
                            events_ref=ref)
    assert res["counts"] == {"skipped": 0, "complete": 2, "failed": 1, "failed_quality": 0}
    cat = pd.read_parquet(Path(out) / S.CATALOG_FILE)
    assert len(cat) == 3 and cat[S.RUN_ID].is_unique
    failed = cat[cat[S.STATUS] == S.STATUS_FAILED].iloc[0]
    assert failed[S.CHECKPOINT_URI] == str(bad)
    assert "CheckpointError" in failed[S.ERROR] and str(bad) in failed[S.ERROR] and "weights_only" in failed[S.ERROR]
    done = cat[cat[S.STATUS] == S.STATUS_COMPLETE]
    assert sorted(done[S.CHECKPOINT_URI]) == ckpts
    cfg_hash = sweep_config_hash(public(data))
    for _, row in done.iterrows():
        assert row[S.RUN_ID] == make_run_id(file_sha256(row[S.CHECKPOINT_URI]), cfg_hash)
        assert row[S.OUTPUT_URI] == f"{out}/runs/{row[S.RUN_ID]}"
        m = read_manifest(row[S.OUTPUT_URI])
        assert m["status"] == S.STATUS_COMPLETE and m["checkpoint_sha256"] == row[S.CHECKPOINT_SHA256]
        assert row[S.QUALITY_PASSED] and row["sampling_s"] > 0 and row["wall_s"] >= row["sampling_s"]
        assert row[S.FINISHED_AT] > row[S.STARTED_AT] and row[S.NUM_DRAWS] == 40 and row[S.N_TRAIN] == 24
        assert list((Path(row[S.OUTPUT_URI]) / "logs").glob("run-*.log"))
    # the two runs differ (different checkpoints), and each is a full attribution
    tops = [pd.read_parquet(Path(u) / S.TOPK_FILE) for u in done[S.OUTPUT_URI]]
    assert not tops[0][S.BIF].equals(tops[1][S.BIF])
    states = {}
    for name, state in events:
        states.setdefault(name, []).append(state)
    assert states["step-999.pt"] == ["planned", "running", "failed"]
    assert states["step-000.pt"] == ["planned", "running", "complete"]
    history = Catalog(out).history()
    assert list(history[S.STATUS]).count(S.STATUS_RUNNING) == 3

    # a second invocation does only what is left: the complete runs are skipped, the failed one retried
    stamps = {u: os.path.getmtime(Path(u) / S.MANIFEST_FILE) for u in done[S.OUTPUT_URI]}
    dry = backfill_flow(config=public(data), checkpoints=str(tmp_path / "ckpts" / "*.pt"), dry_run=True)
    assert dry["counts"] == {"run": 0, "resume": 0, "retry": 1, "skip": 2}
    again = backfill_flow(config=public(data), checkpoints=str(tmp_path / "ckpts" / "*.pt"), max_concurrent=2)
    assert again["counts"] == {"skipped": 2, "complete": 0, "failed": 1, "failed_quality": 0}
    assert {u: os.path.getmtime(Path(u) / S.MANIFEST_FILE) for u in done[S.OUTPUT_URI]} == stamps
    assert len(pd.read_parquet(Path(out) / S.CATALOG_FILE)) == 3


@pytest.mark.slow
def test_backfill_on_s3_with_checkpoints_and_outputs_in_the_bucket(prefect_api_url, dask_address, s3_bucket):
    import fsspec

    from bif.flows.backfill import backfill_flow
    from bif.flows.runtime import credentials

    bucket, opts = s3_bucket
    make_checkpoints(f"s3://{bucket}/ckpts", 2, storage_options=opts)
    out = f"s3://{bucket}/sweep"
    with credentials(opts) as ref:
        res = backfill_flow(config=public(sweep_data(out, {"address": dask_address})),
                            checkpoints=f"s3://{bucket}/ckpts/*.pt", credentials_ref=ref)
    assert res["counts"]["complete"] == 2
    cat = Catalog(out, opts).read()
    assert set(cat[S.STATUS]) == {S.STATUS_COMPLETE}
    assert all(u.startswith(f"s3://{bucket}/ckpts/step-") for u in cat[S.CHECKPOINT_URI])
    fs = fsspec.filesystem("s3", **opts)
    for u in cat[S.OUTPUT_URI]:
        assert read_manifest(u, opts)["status"] == S.STATUS_COMPLETE
        assert fs.exists(f"{u}/{S.TOPK_FILE}")
        assert opts["secret"].encode() not in fs.cat(f"{u}/{S.MANIFEST_FILE}")


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(home)
    return env


def test_backfill_dry_run_cli_plans_without_a_server(tmp_path):
    """`bif backfill CONFIG --checkpoints GLOB --dry-run` as typed: a plan table, no server, nothing written."""
    make_checkpoints(str(tmp_path / "ckpts"), 2)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep_data("sweep")))
    res = subprocess.run([sys.executable, "-m", "bif.flows.cli", "backfill", "sweep.yaml", "--checkpoints",
                          "ckpts/*.pt", "--dry-run"], cwd=tmp_path, env=_env(tmp_path / "home"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(" run ") >= 2 and "step-000.pt" in res.stdout and "2 to run" in res.stdout
    assert not (tmp_path / "sweep" / S.CATALOG_DIR).exists()
    bad = subprocess.run([sys.executable, "-m", "bif.flows.cli", "backfill", "sweep.yaml", "--checkpoints",
                          "ckpts/*.pt", "--since", "yesterday", "--dry-run"], cwd=tmp_path,
                         env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr


def test_backfill_cli_reports_a_failed_run_as_a_row_not_a_traceback(tmp_path, user_prefect_home):
    """`bif backfill` as typed, on a checkpoint that cannot be loaded: exit 2, the failure a row of its table and
    of the catalog, the traceback in the run's log and not on the terminal (it printed Prefect's ERROR record and
    50 lines of traceback above the table: the sweep ran its flow without `bif run`'s quiet terminal)."""
    from test_cli import assert_quiet, user_env

    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "step-000.pt").write_bytes(b"this is not a torch checkpoint")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep_data("sweep")))
    res = subprocess.run([str(Path(sys.executable).parent / "bif"), "backfill", "sweep.yaml", "--checkpoints",
                          "ckpts/*.pt", "--no-progress"], cwd=tmp_path, env=user_env(user_prefect_home),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stdout + res.stderr
    assert_quiet(res)
    assert "ERROR" not in res.stderr and "0 complete, 1 failed, 0 skipped" in res.stdout, res.stdout + res.stderr
    cat = pd.read_parquet(tmp_path / "sweep" / S.CATALOG_FILE)
    assert list(cat[S.STATUS]) == [S.STATUS_FAILED] and "CheckpointError" in cat[S.ERROR].iloc[0]
    logs = list((tmp_path / "sweep" / "runs" / cat[S.RUN_ID].iloc[0] / "logs").glob("run-*.log"))
    assert logs and "Traceback" in logs[0].read_text() and "CheckpointError" in logs[0].read_text()


REPO = Path(__file__).resolve().parents[1]
#: the README's sweep commands run as typed, with these settings appended to keep the digits runs small
SMALL = ["--set", "problem_args.n_train=200", "--set", "problem_args.n_query=12", "--set", "sampler.num_chains=2",
         "--set", "sampler.num_draws=60", "--set", "sampler.num_burnin_steps=10",
         "--set", "sampler.draws_per_block=30", "--set", "quality.allow_warnings=true"]


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Operations: many checkpoints")
    return text[start:text.index("\n## ", start + 10)]


def _blocks(section: str, lang: str) -> list[str]:
    parts = section.split(f"```{lang}\n")[1:]
    return [p.split("```", 1)[0] for p in parts]


@pytest.mark.slow
def test_readme_operations_commands_as_typed(tmp_path, user_prefect_home):
    """Every command of the README's Operations section, in a user's shell (no PREFECT_API_URL), then
    its DuckDB example exactly as written."""
    import shlex
    import shutil

    from test_cli import user_env

    (tmp_path / "bif" / "examples").mkdir(parents=True)
    shutil.copy(REPO / "bif" / "examples" / "digits.yaml", tmp_path / "bif" / "examples" / "digits.yaml")
    env = user_env(user_prefect_home)
    section = _readme_section()
    commands = [shlex.split(line, comments=True) for line in _blocks(section, "bash")[0].splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["bif", "example"]] * 3 + [["bif", "backfill"]] * 2 + [["bif", "watch"],
                                                                                               ["bif", "trend"]]
    results = []
    for argv in commands:
        extra = SMALL if argv[1] in ("backfill", "watch") else []
        argv = [str(Path(sys.executable).parent / "bif"), *argv[1:], *extra]
        results.append(subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600))
        assert results[-1].returncode == 0, (argv, results[-1].stdout[-2000:], results[-1].stderr[-3000:])
    dry, backfill, watch, trend = results[3:]
    assert "plan: 3 to run, 0 to resume, 0 to retry, 0 skipped" in dry.stdout
    assert "3 complete, 0 failed, 0 skipped" in backfill.stdout
    assert "0 complete, 0 failed, 3 skipped" in watch.stdout
    cat = pd.read_parquet(tmp_path / "runs" / "sweep" / S.CATALOG_FILE)
    assert [Path(u).name for u in cat[S.CHECKPOINT_URI]] == ["digits-e010.pt", "digits-e030.pt", "digits-e100.pt"]
    assert set(cat[S.STATUS]) == {S.STATUS_COMPLETE} and cat[S.RUN_ID].is_unique
    assert "digits-e010.pt" in trend.stdout and "Jaccard" in trend.stdout
    page = (tmp_path / "runs" / "sweep" / "trend-query-3.html").read_text()
    assert "data:image/png;base64," in page and "Query 3" in page
    # the DuckDB example, exactly as written
    code = _blocks(section, "python")[0]
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if ".pt" in line]
    assert len(rows) == 9  # 3 checkpoints x the 3 strongest train examples
    top = pd.concat(pd.read_parquet(tmp_path / u / S.TOPK_FILE) for u in cat[S.OUTPUT_URI])
    first = top[(top[S.QUERY] == 3) & (top[S.DIRECTION] == "positive") & (top[S.RANK] == 0)]
    assert len(first) == 3 and all(f" {int(t)} " in res.stdout for t in first[S.TRAIN])
