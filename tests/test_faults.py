"""Found by trying to break it (issue 7, section 7): a replaced checkpoint, a refused rerun, two runs
into one output, a corrupt trace block, a lost S3 endpoint, a NaN loss at w*, and errors that must
come before any server starts. Real Prefect, Dask and moto throughout."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from bif import schema as S
from bif.flows.cli import main
from bif.config import build_config, load_config
from bif.errors import ConfigError, ProblemError, RunConflictError, StorageError
from bif.examples import linear
from bif.store.lease import LEASE_FILE, LEASE_LOCK_FILE, OutputBusyError, OutputLease
from bif.store.manifest import read_manifest
from conftest import S3_KEY, S3_SECRET
from bif.tasks import pipeline

LINEAR_ARGS = {"n": 40, "d": 4, "m": 6, "singular": True, "seed": 2}
SAMPLER = {"num_chains": 2, "num_draws": 60, "num_burnin_steps": 20, "steps_per_draw": 2, "step_size": 2e-3,
           "gamma": 10.0, "nbeta": 40.0, "batch_size": 40, "seed": 3, "draws_per_block": 20,
           "trace_dtype": "float64"}
BIF = Path(sys.executable).parent / "bif"
ROOT = Path(__file__).resolve().parents[1]


# --- helpers --------------------------------------------------------------------------------------

def _save_checkpoint(path: Path, *, shift: float = 0.0) -> Path:
    """A state dict of the linear problem's model (same architecture), weights shifted by ``shift``."""
    model = linear.build(**LINEAR_ARGS).model
    torch.save({k: v + shift for k, v in model.state_dict().items()}, path)
    return path


def _cfg(output, address, **over):
    data = {"problem": "bif.examples.linear:build", "problem_args": LINEAR_ARGS, "output": str(output),
            "sampler": SAMPLER, "covariance": {"train_block_size": 16, "query_block_size": 4, "topk": 5},
            "compute": {"address": address}}
    for k, v in over.items():
        data[k] = (data.get(k) or {}) | v if isinstance(v, dict) and k not in ("problem_args", "storage_options") else v
    return build_config(data)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a run (except the lease) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (LEASE_FILE, LEASE_LOCK_FILE)}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + [env.get("PYTHONPATH", "")])
    return env


def _bif(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([str(BIF), *args], env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


# --- 1. a replaced checkpoint is never served stale results -----------------------------------------

@pytest.mark.e2e
def test_replaced_checkpoint_after_a_complete_run_is_refused(tmp_path, dask_address):
    from bif.flows.attribution import run_attribution

    ckpt = _save_checkpoint(tmp_path / "latest.pt")
    out = tmp_path / "run"
    cfg = _cfg(out, dask_address, checkpoint=str(ckpt))
    manifest = run_attribution(cfg, show_progress=False)
    assert manifest["status"] == S.STATUS_COMPLETE
    import hashlib

    old_sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert manifest["checkpoint_sha256"] == old_sha
    stored = json.loads((out / S.CONFIG_FILE).read_text())["identity"]
    assert stored["checkpoint_sha256"] == old_sha and len(stored["model_sha256"]) == 64
    assert len(stored["data_sha256"]) == 64
    # the same command again on the same file: skipped as complete
    assert run_attribution(cfg, show_progress=False).get("skipped") is True
    before = _snapshot(out)

    _save_checkpoint(ckpt, shift=0.05)  # training overwrote latest.pt
    new_sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with pytest.raises(RunConflictError) as ei:
        run_attribution(cfg, show_progress=False)
    msg = str(ei.value)
    assert old_sha in msg and new_sha in msg and "another --output" in msg
    assert _snapshot(out) == before  # untouched: manifest still complete, results intact
    assert read_manifest(str(out))["status"] == S.STATUS_COMPLETE
    assert not (out / LEASE_FILE).exists()
    assert main(["show", str(out), "--query", "1", "-k", "2"]) == 0  # (no capsys: Prefect's log handler
    # would keep its closed stream for the next test)

    # the same through the console script: exit 2 in seconds, before any server starts, no traceback
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.public_dict() | {"storage_options": {}, "compute": {}}))
    proc, secs = _bif("run", str(path), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert old_sha in proc.stderr and new_sha in proc.stderr and "another --output" in proc.stderr
    assert "Traceback" not in proc.stderr and "Prefect API" not in proc.stderr
    assert secs < 30, secs
    assert _snapshot(out) == before


@pytest.mark.e2e
def test_replaced_checkpoint_mid_run_refuses_to_resume(tmp_path, dask_address):
    """A run interrupted after chain 0 committed its blocks; the checkpoint changes; neither the flow nor a
    chain task (as a deployed flow or a retry would run it) resumes: blocks of two checkpoints never mix."""
    from bif.flows.attribution import run_attribution

    ckpt = _save_checkpoint(tmp_path / "latest.pt")
    out = tmp_path / "run"
    cfg = _cfg(out, dask_address, checkpoint=str(ckpt))
    info = pipeline.prepare_run(cfg)
    pipeline.run_chain(cfg, 0, ref_train_loss_mean=info.ref_train_loss_mean)  # then the run was killed
    assert read_manifest(str(out))["status"] == S.STATUS_RUNNING
    before = _snapshot(out)

    _save_checkpoint(ckpt, shift=0.05)
    with pytest.raises(RunConflictError, match=r"checkpoint_sha256 [0-9a-f]{64}, now [0-9a-f]{64}"):
        run_attribution(cfg, show_progress=False)
    with pytest.raises(RunConflictError, match="chain 1 refuses to resume"):
        pipeline.run_chain(cfg, 1, ref_train_loss_mean=info.ref_train_loss_mean)
    assert _snapshot(out) == before
    assert not (out / S.TRACES_DIR / "chain-1").exists()

    # the model's weights at w* are part of the identity too, e.g. when a factory trains its own model
    _save_checkpoint(ckpt)  # the original file again: resumable
    cfg_other = _cfg(out, dask_address, checkpoint=str(ckpt))
    assert pipeline.preflight(cfg_other).checkpoint_sha256 == info.checkpoint_sha256
    manifest = run_attribution(cfg_other, show_progress=False)
    assert manifest["status"] == S.STATUS_COMPLETE and manifest["resumed_blocks"] == [3, 0]


def test_changed_data_or_model_changes_the_identity(tmp_path):
    cfg = _cfg(tmp_path / "x", None)
    a = pipeline.preflight(cfg)
    b = pipeline.preflight(_cfg(tmp_path / "x", None, problem_args=LINEAR_ARGS | {"seed": 5}))
    assert a.data_sha256 != b.data_sha256 and a.model_sha256 != b.model_sha256
    assert a.checkpoint_sha256 is None
    again = pipeline.preflight(cfg)
    assert (again.data_sha256, again.model_sha256) == (a.data_sha256, a.model_sha256)


# --- 2. a refused rerun leaves the existing run untouched ---------------------------------------------

@pytest.fixture
def complete_run(linear_complete_run, dask_address) -> Path:
    """The output folder of one complete run of the default config (``_cfg``): the session's
    ``linear_complete_run`` (tests/conftest.py), which is exactly that config. Two tests here use it
    read-only (they used to run the same config twice): the refused rerun checks that it stays byte for
    byte untouched, and the corrupt-block test takes its traces as the uninterrupted reference."""
    out = linear_complete_run.out
    assert _cfg(out, dask_address).hash() == linear_complete_run.cfg.hash()  # the same config
    assert linear_complete_run.manifest["status"] == S.STATUS_COMPLETE
    return out


@pytest.mark.e2e
def test_refused_rerun_with_changed_sampler_leaves_the_run_untouched(complete_run, dask_address):
    from bif.flows.attribution import run_attribution

    out = complete_run
    before = _snapshot(out)
    with pytest.raises(RunConflictError, match="config hash .* left untouched"):
        run_attribution(_cfg(out, dask_address, sampler=SAMPLER | {"num_draws": 80}), show_progress=False)
    assert _snapshot(out) == before
    assert read_manifest(str(out))["status"] == S.STATUS_COMPLETE
    proc, _ = _bif("show", str(out), "--query", "0", "-k", "1")
    assert proc.returncode == 0 and "query 0" in proc.stdout, proc.stderr


# --- 3. two runs into one output ----------------------------------------------------------------------

@pytest.mark.e2e
def test_second_run_into_a_busy_output_is_refused(tmp_path, dask_address):
    from bif.flows.attribution import run_attribution

    out = tmp_path / "run"
    # the first run's SGLD steps wait while `hold` exists, so it is still sampling when the second one starts
    # (a first run left to itself could finish before the second reached the lease: "DID NOT RAISE", 1 CI run in 5)
    hold, held = tmp_path / "hold", tmp_path / "held"
    hold.touch()
    cfg = _cfg(out, dask_address, sampler=SAMPLER | {"num_draws": 600, "draws_per_block": 100},
               problem="fault_problems:held_while", problem_args=LINEAR_ARGS | {"hold": str(hold), "held": str(held)})
    result: dict = {}
    first = threading.Thread(target=lambda: result.update(m=run_attribution(cfg, show_progress=False)))
    first.start()
    try:
        deadline = time.monotonic() + 120
        while not held.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.exists(), "the first run never reached its sampling"
        lease = json.loads((out / LEASE_FILE).read_text())
        assert lease["pid"] == os.getpid() and lease["expires_at"] > time.time()
        t0 = time.monotonic()
        with pytest.raises(OutputBusyError, match=r"in use by another run .*another --output") as ei:
            run_attribution(cfg, show_progress=False)
        assert ei.value.exit_code == 2 and time.monotonic() - t0 < 30
    finally:
        hold.unlink()
    first.join(timeout=300)
    assert result["m"]["status"] == S.STATUS_COMPLETE  # the first run is unharmed
    assert not (out / LEASE_FILE).exists()  # released at the end
    traces = pd.read_parquet(out / S.TRACES_DIR)
    assert len(traces) == 2 * 600 * 46 and not traces.duplicated([S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE]).any()


def test_lease_lapses_for_a_crashed_holder_and_is_renewed(tmp_path):
    uri = str(tmp_path / "out")
    os.makedirs(uri)
    path = Path(uri) / LEASE_FILE
    # a live holder on another host: refused
    path.write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 60}))
    with pytest.raises(OutputBusyError, match="owner x, host elsewhere"):
        OutputLease(uri).acquire()
    # its lease expired (it crashed): taken over
    path.write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 1}))
    lease = OutputLease(uri, ttl_s=0.4).acquire()
    assert json.loads(path.read_text())["owner"] == lease.owner
    # a crashed holder on this host (its process is gone) lapses at once
    lease.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"owner": "y", "host": socket.gethostname(), "pid": dead.pid,
                                "expires_at": time.time() + 60}))
    lease = OutputLease(uri, ttl_s=0.4).acquire()
    first_expiry = json.loads(path.read_text())["expires_at"]
    time.sleep(0.5)  # the heartbeat renews every ttl / 4
    assert json.loads(path.read_text())["expires_at"] > first_expiry
    with pytest.raises(OutputBusyError):
        OutputLease(uri).acquire()
    lease.release()
    assert not path.exists()


def _acquire_at_once(leases: list[OutputLease]) -> list[str | None]:
    """Each lease's acquire, on threads released together: "won", or the OutputBusyError's message (None: another
    error, which the thread leaves uncaught)."""
    outcome: list[str | None] = [None] * len(leases)
    barrier = threading.Barrier(len(leases))

    def take(i):
        barrier.wait()
        try:
            leases[i].acquire()
            outcome[i] = "won"
        except OutputBusyError as err:
            outcome[i] = str(err)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


def test_concurrent_local_takeovers_of_a_lapsed_lease_leave_one_owner(tmp_path):
    """Eight threads take over the same lapsed local lease at once: exactly one wins, the others are refused
    with the winner named, and the file names the winner. On local disks acquiring holds a flock of lease.lock, so
    no takeover acts on a stale reading (and the create needs no settle delay: 0.2 s of every run)."""
    uri = str(tmp_path / "out")
    os.makedirs(uri)
    path = Path(uri) / LEASE_FILE
    path.write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 1}))
    leases = [OutputLease(uri, ttl_s=60) for _ in range(8)]
    outcome = _acquire_at_once(leases)
    assert outcome.count("won") == 1, outcome
    winner = leases[outcome.index("won")]
    assert json.loads(path.read_text())["owner"] == winner.owner
    assert all(o is not None and winner.owner in o for o in outcome if o != "won")
    winner.release()
    assert os.listdir(uri) == [LEASE_LOCK_FILE]  # the lease is gone; the empty lock file stays


def test_lease_on_s3_only_one_of_concurrent_runs_wins(s3_bucket):
    bucket, opts = s3_bucket
    uri = f"s3://{bucket}/runs/shared"
    leases = [OutputLease(uri, opts) for _ in range(4)]
    outcome = _acquire_at_once(leases)
    assert outcome.count("won") == 1 and None not in outcome, outcome  # the other three refused: OutputBusyError
    winner = leases[outcome.index("won")]
    assert winner.read()["owner"] == winner.owner
    winner.release()
    assert winner.read() is None
    nxt = OutputLease(uri, opts).acquire()  # free again
    nxt.release()


# --- 4. a corrupt committed trace block -----------------------------------------------------------------

@pytest.mark.e2e
def test_corrupt_block_is_redone_and_traces_equal_an_uninterrupted_run(tmp_path, dask_address, complete_run):
    from bif.flows.attribution import run_attribution

    ref_out = complete_run  # an uninterrupted run of the same config
    assert read_manifest(str(ref_out))["status"] == S.STATUS_COMPLETE
    expected = pd.read_parquet(ref_out / S.TRACES_DIR).sort_values([S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE])

    out = tmp_path / "run"
    cfg = _cfg(out, dask_address)
    info = pipeline.prepare_run(cfg)
    for c in range(2):  # every chain finished; the run was interrupted before the covariance
        pipeline.run_chain(cfg, c, ref_train_loss_mean=info.ref_train_loss_mean)
    bad = out / S.TRACES_DIR / "chain-1" / "block-00001.parquet"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 3] ^= 0x5A  # flipped bytes
    bad.write_bytes(bytes(raw))
    # a reader names the file and says that a rerun redoes it
    with pytest.raises(StorageError, match=r"block-00001\.parquet.*Rerun the same command"):
        pipeline.reduce_covariance(cfg, info)
    (out / S.TRACES_DIR / "chain-0" / "block-00002.parquet").write_bytes(b"truncated")
    manifest = run_attribution(cfg, show_progress=False)
    assert manifest["status"] == S.STATUS_COMPLETE
    assert manifest["resumed_blocks"] == [2, 1]
    got = pd.read_parquet(out / S.TRACES_DIR).sort_values([S.CHAIN, S.DRAW, S.SPLIT, S.SAMPLE])
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True), check_exact=True)


# --- 5. losing the S3 endpoint mid-run -----------------------------------------------------------------

def _moto(port: int = 0):
    from moto.server import ThreadedMotoServer

    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    return server, port


def _moto_bucket():
    """A moto server of the test's own (so it can be stopped), a fresh bucket, and storage options that fail
    fast while the endpoint is down (the defaults retry for much longer)."""
    import boto3

    server, port = _moto()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"bif-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    opts = {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": endpoint},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    return server, port, endpoint, bucket, opts


@pytest.mark.e2e
@pytest.mark.slow  # ~2.5 min here (a run and its resume on moto); the fast test below covers the error itself
def test_lost_s3_endpoint_mid_run_is_a_clear_storage_error(dask_address):
    server, port, endpoint, bucket, opts = _moto_bucket()
    uri = f"s3://{bucket}/runs/outage"
    from bif.flows.attribution import run_attribution

    from bif.store.fs import get_fs

    cfg = _cfg(uri, dask_address, storage_options=opts,
               sampler=SAMPLER | {"num_draws": 200, "draws_per_block": 10, "steps_per_draw": 10})
    fs, root = get_fs(uri, opts)
    stopped = threading.Event()

    def stop_after_first_block():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if fs.glob(f"{root}/{S.TRACES_DIR}/chain-*/block-*.parquet"):
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.1)
        server.stop()
        stopped.set()

    threading.Thread(target=stop_after_first_block, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            run_attribution(cfg, show_progress=False)
        print(f"failed after {time.monotonic() - t0:.1f} s")
        assert stopped.is_set()
        msg = str(ei.value)
        assert endpoint in msg and "a rerun resumes" in msg and S3_SECRET not in msg
    finally:
        server, _ = _moto(port)  # the store comes back
    try:
        fs.invalidate_cache()
        manifest = json.loads(fs.cat_file(f"{root}/{S.MANIFEST_FILE}"))
        assert manifest["status"] in (S.STATUS_RUNNING, S.STATUS_FAILED)  # never complete
        # the rerun resumes and completes (gates and diagnostics off to keep the test short; not in the config hash)
        t0 = time.monotonic()
        manifest = run_attribution(_cfg(uri, dask_address, storage_options=opts, sampler=dict(cfg.sampler),
                                        quality={"enabled": False, "diagnostics": False}), show_progress=False)
        print(f"rerun took {time.monotonic() - t0:.1f} s")
        assert manifest["status"] == S.STATUS_COMPLETE and sum(manifest["resumed_blocks"]) >= 1
    finally:
        server.stop()


def test_lost_endpoint_is_a_storage_error_and_failed_is_written_when_it_comes_back(tmp_path):
    server, port, endpoint, bucket, opts = _moto_bucket()
    cfg = _cfg(f"s3://{bucket}/r", None, storage_options=opts)
    info = pipeline.prepare_run(cfg)
    server.stop()
    # a chain that loses the endpoint: a clear StorageError naming the URI and the endpoint, no botocore trace
    with pytest.raises(StorageError, match=rf"s3://{bucket}/r.* at endpoint {endpoint} failed: "
                                           r"EndpointConnectionError.*a rerun resumes") as ei:
        pipeline.run_chain(cfg, 0, ref_train_loss_mean=info.ref_train_loss_mean)
    assert S3_SECRET not in str(ei.value) and ei.value.exit_code == 2
    done = threading.Event()
    t = threading.Thread(target=lambda: (pipeline.fail_run(cfg, StorageError("endpoint lost")), done.set()))
    t.start()
    time.sleep(1.5)
    assert not done.is_set()  # still retrying
    server, _ = _moto(port)
    try:
        t.join(timeout=30)
        manifest = read_manifest(cfg.output, opts)
        assert manifest["status"] == S.STATUS_FAILED and "endpoint lost" in manifest["error"]
    finally:
        server.stop()


# --- 6. a NaN loss at w* ----------------------------------------------------------------------------------

def test_nan_or_out_of_bounds_loss_at_wstar_fails_before_sampling(tmp_path):
    cfg = _cfg(tmp_path / "nan", None, problem="fault_problems:nan_at_wstar")
    with pytest.raises(ProblemError, match=r"loss at the checkpoint w\* is nan for query sample 3"):
        pipeline.preflight(cfg)
    with pytest.raises(ProblemError, match=r"query sample 3"):
        pipeline.prepare_run(cfg)
    assert not (tmp_path / "nan" / S.REFERENCE_FILE).exists() and read_manifest(str(tmp_path / "nan")) is None
    cfg = _cfg(tmp_path / "neg", None, problem="fault_problems:negative_loss")
    with pytest.raises(ProblemError, match=r"for train sample 0, outside problem.loss_bounds \(0.0, 1000000000.0\)"):
        pipeline.prepare_run(cfg)


# --- 7. errors that must come first, fast, and without secrets ------------------------------------------

def test_malformed_set_is_a_config_error_before_any_server(tmp_path):
    proc, secs = _bif("run", str(ROOT / "bif" / "examples" / "digits.yaml"), "--set", "sampler.num_draws=[1,",
                      "--output", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert "override 'sampler.num_draws=[1,'" in proc.stderr and "not valid YAML" in proc.stderr
    assert "Traceback" not in proc.stderr and "Prefect API" not in proc.stderr
    assert secs < 30, secs  # the CI machine is slow to import torch; the real proof is no "Prefect API" line
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, overrides=["problem=a:b", "sampler.num_draws=[1,"])


def test_raising_factory_is_a_problem_error_before_any_server(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"problem": "fault_problems:raising_factory", "problem_args": {"k": 1},
                                    "output": str(tmp_path / "o")}))
    proc, secs = _bif("run", str(path), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert re.search(r"problem factory 'fault_problems:raising_factory' raised RuntimeError: boom: the dataset "
                     r"server is down .*problem_args \{'k': 1\}", proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and "Prefect API" not in proc.stderr
    assert secs < 30, secs  # the CI machine is slow to import torch; the real proof is no "Prefect API" line
    assert not (tmp_path / "o" / S.MANIFEST_FILE).exists()


def test_bad_checkpoint_is_reported_before_any_server(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"problem": "bif.examples.linear:build", "checkpoint": str(tmp_path / "bad.pt"),
                                    "output": str(tmp_path / "o")}))
    proc, secs = _bif("run", str(path), "--no-progress")
    assert proc.returncode == 2 and "could not be loaded as a state dict" in proc.stderr, proc.stderr
    assert "Prefect API" not in proc.stderr and secs < 30, secs


@pytest.mark.parametrize("options", [
    S3_SECRET,  # a string instead of a mapping
    [S3_KEY, S3_SECRET],  # a list
    {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": 5}},  # a bad value type
    {"key": S3_KEY, "secret": S3_SECRET, "not_an_option": 1},  # an unknown option
])
def test_storage_options_errors_never_echo_the_secret(options, moto_server):
    from bif.errors import BifError

    data = {"problem": "bif.examples.linear:build", "output": "s3://bif-no-bucket/x", "storage_options": options}
    with pytest.raises(BifError) as ei:
        cfg = build_config(data)
        pipeline.preflight(cfg)
    assert S3_SECRET not in str(ei.value) and S3_KEY not in str(ei.value)
    assert "storage_options" in str(ei.value) or "s3://bif-no-bucket/x" in str(ei.value)
    # a config-level error with the secret in the same mapping does not echo it either
    with pytest.raises(ConfigError) as ei:
        build_config({"problem": "no-colon", "storage_options": {"secret": S3_SECRET}})
    assert S3_SECRET not in str(ei.value) and "module:function" in str(ei.value)
