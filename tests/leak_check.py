"""The credentials check shared by the CLI tests (test_cli, test_credentials): after a `bif` command
wrote to S3 (moto) with the marker secret in its config's ``storage_options``, the marker is in none
of: the terminal, Prefect's database (every file of the PREFECT_HOME the command used), any object
in the bucket (the run's log file included), any local file but the user's own config."""
from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import S3_KEY, S3_SECRET


def assert_no_leak(res: subprocess.CompletedProcess, home: Path, workdir: Path, bucket: str, opts: dict,
                   flow_name: str, log_prefix: str, *, config_name: str = "cfg.yaml") -> dict[str, bytes]:
    """The marker is nowhere; returns the bucket's objects (path -> bytes) for the caller's checks."""
    import s3fs

    markers = (S3_SECRET.encode(), S3_KEY.encode())
    for m in (S3_SECRET, S3_KEY):
        assert m not in res.stdout and m not in res.stderr
    # Prefect's database (and its WAL / journal files): the server the CLI started used this home
    db_files = [p for p in home.rglob("*") if p.is_file()]
    db = home / "prefect.db"
    assert db.exists() and db.stat().st_size > 10_000
    db_bytes = b"".join(p.read_bytes() for p in db_files if p.name.startswith("prefect.db"))
    assert flow_name.encode() in db_bytes
    assert bucket.encode() in db_bytes  # this run's (public) config is in there, as a flow parameter
    for p in db_files:
        assert not any(m in p.read_bytes() for m in markers), f"marker in {p}"
    # every object in the bucket, the run log included
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs=opts["client_kwargs"])
    objects = {p: fs.cat_file(p) for p in fs.find(bucket)}
    for p, data in objects.items():
        assert not any(m in data for m in markers), f"marker in s3://{p}"
    logs = [p for p in objects if f"/logs/{log_prefix}-" in p]
    assert logs, sorted(objects)
    assert b"Beginning flow run" in objects[logs[0]]
    # every local file except the user's own config
    for p in workdir.rglob("*"):
        if p.is_file() and p.name != config_name:
            assert not any(m in p.read_bytes() for m in markers), f"marker in {p}"
    return objects
