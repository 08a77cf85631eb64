"""Rule 5, one runtime inside every flow: the flows called directly, as a Prefect deployment
calls them (no scheduler address, no credentials ref), build their own Dask cluster from
``cfg.compute`` and run their tasks in its worker processes, with the same results as the
CLI path; the credentials policy resolves inside the flow (ambient ``{}`` or a Secret block)."""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import xarray as xr
from bif.flows import runtime
from prefect import flow

from bif import schema as S
from bif.config import build_config
from bif.store.manifest import read_manifest

pytestmark = pytest.mark.e2e

LINEAR_ARGS = {"n": 40, "d": 4, "m": 6, "singular": True, "seed": 2}
SAMPLER = {"num_chains": 2, "num_draws": 200, "num_burnin_steps": 100, "steps_per_draw": 10,
           "step_size": 2e-3, "gamma": 10.0, "nbeta": 40.0, "batch_size": 40, "seed": 3,
           "draws_per_block": 100, "trace_dtype": "float64"}


def _data(output: str, compute: dict) -> dict:
    return {"problem": "bif.examples.linear:build", "problem_args": LINEAR_ARGS, "output": output,
            "sampler": SAMPLER, "covariance": {"train_block_size": 16, "query_block_size": 4, "topk": 5},
            "compute": compute}


def _public(data: dict) -> dict:
    """What a deployment passes: RunConfig data, no credentials."""
    return build_config(data).public_dict() | {"storage_options": {}}


def _worker_pids(address: str) -> set[int]:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return set(client.run(os.getpid).values())


def test_deployed_attribution_flow_runs_chains_on_its_own_dask_cluster(tmp_path, prefect_api_url, dask_address):
    from bif.flows.attribution import attribution_flow, run_attribution

    manifest = attribution_flow(config=_public(_data(str(tmp_path / "direct"), {"n_workers": 2})))
    assert manifest["status"] == S.STATUS_COMPLETE
    assert read_manifest(str(tmp_path / "direct"))["status"] == S.STATUS_COMPLETE
    t = manifest["timings"]
    # the chains ran in worker processes of a cluster the flow started itself: not here, not the session's
    assert len(t["chain_pid"]) == 2 and os.getpid() not in t["chain_pid"] and 0 not in t["chain_pid"]
    assert not set(t["chain_pid"]) & _worker_pids(dask_address)
    assert t["cluster_startup_s"] > 0  # started in the flow, and counted
    assert manifest["quality"] is not None and manifest["diagnostics"]["num_chains"] == 2

    # the CLI path (cluster joined, credentials ref, log file) gives the same numbers
    ref = run_attribution(build_config(_data(str(tmp_path / "cli"), {"address": dask_address})), show_progress=False)
    assert ref["status"] == S.STATUS_COMPLETE
    assert set(ref["timings"]["chain_pid"]) <= _worker_pids(dask_address)
    bif = [xr.open_zarr(tmp_path / d / S.BIF_ZARR, consolidated=False)[S.BIF].values for d in ("direct", "cli")]
    np.testing.assert_array_equal(bif[0], bif[1])
    assert np.isfinite(bif[0]).all() and np.abs(bif[0]).max() > 0


def test_deployed_lds_flow_retrains_on_its_own_dask_cluster(tmp_path, prefect_api_url):
    from bif.flows.lds import lds_flow

    from bif.evaluation.settings import LDSSettings

    data = {"problem": "bif.examples.logistic:build", "problem_args": {"n": 40, "n_query": 6},
            "output": str(tmp_path / "out"), "compute": {"n_workers": 2},
            "sampler": {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 20, "steps_per_draw": 2,
                        "step_size": 1e-2, "gamma": 10.0, "batch_size": 40}}
    st = LDSSettings(num_subsets=6, num_seeds=1, methods=("graddot",))
    res = lds_flow(config=_public(data), settings=st.model_dump(mode="json"))
    assert res["cached"] is False and res["num_retrained"] == 6
    assert res["retrain_pids"] and os.getpid() not in res["retrain_pids"]
    assert len(res["retrain_pids"]) <= 2  # two worker processes
    assert [m["method"] for m in res["methods"]] == ["graddot"] and np.isfinite(res["methods"][0]["lds"])


@flow(name="bif-test-credentials-policy")
def _policy_flow(credentials_ref: str | None = None, secret_block: str | None = None) -> dict:
    return runtime.flow_config({"problem": "bif.examples.linear:build", "output": "s3://b/x"},
                               credentials_ref, secret_block).storage_options


def test_credentials_policy_inside_a_deployed_flow(tmp_path, prefect_api_url, dask_address, s3_bucket):
    import fsspec
    from bif.flows.attribution import attribution_flow
    from prefect.blocks.system import Secret

    bucket, opts = s3_bucket
    # (c) no registry ref, no block: ambient credentials
    assert _policy_flow() == {}
    assert _policy_flow(credentials_ref="not-registered-here") == {}
    # (a) the process-local registry (the CLI's path)
    with runtime.credentials(opts) as ref:
        assert _policy_flow(credentials_ref=ref) == opts
    # (b) a Prefect Secret block, the deployed path: the flow writes to S3 with the block's options
    block = f"bif-s3-{uuid.uuid4().hex[:8]}"
    Secret(value=opts).save(block)
    assert _policy_flow(secret_block=block) == opts
    out = f"s3://{bucket}/runs/deployed"
    manifest = attribution_flow(config=_public(_data(out, {"address": dask_address})), secret_block=block)
    assert manifest["status"] == S.STATUS_COMPLETE
    fs = fsspec.filesystem("s3", **opts)
    assert fs.exists(f"{bucket}/runs/deployed/{S.MANIFEST_FILE}") and fs.exists(f"{bucket}/runs/deployed/{S.BIF_ZARR}")
    assert read_manifest(out, opts)["status"] == S.STATUS_COMPLETE
    for name in (S.MANIFEST_FILE, S.CONFIG_FILE):
        assert opts["secret"] not in fs.cat(f"{bucket}/runs/deployed/{name}").decode()


def test_prefect_settings_are_serialized_once_per_settings_object():
    """runtime.serialize_settings_once: prefect-dask dumps the settings for every task it submits (13-17 ms each);
    the dump is kept per settings object. The same dict as Prefect's own dump, handed out again for the same
    object; another settings object (another profile or override) gets its own."""
    from prefect.context import SettingsContext
    from prefect.settings import PREFECT_LOGGING_LEVEL

    runtime.serialize_settings_once()
    runtime.serialize_settings_once()  # installed once: the second call changes nothing
    assert getattr(SettingsContext.serialize, "_bif_cached", False)
    ctx = SettingsContext.get()
    first = ctx.serialize()
    assert ctx.serialize() is first
    assert first == SettingsContext.serialize._bif_original(ctx) and first["settings"]
    level = "ERROR" if ctx.settings.logging.level != "ERROR" else "DEBUG"
    other = SettingsContext(profile=ctx.profile,
                            settings=ctx.settings.copy_with_update(updates={PREFECT_LOGGING_LEVEL: level}))
    dump = other.serialize()
    assert dump["settings"]["logging"]["level"] == level != first["settings"].get("logging", {}).get("level")
    assert other.serialize() is dump and ctx.serialize() is first
