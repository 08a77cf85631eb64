"""infra/: the compose stack and the image, checked without a Docker engine.

The compose file is parsed and its services, commands, images and secrets are checked; every
`bif` / `prefect` / `dask` command that a container runs is run here with `--help` (with the
options the compose file passes); the image's Dask config is shown to drop the nanny's
MALLOC_TRIM_THRESHOLD_; the ambient S3 variables that the containers get are shown to be enough
for the pipeline's S3 writes (moto's real S3 server). `docker-compose config` / `docker compose
config` validate the file when a client is installed (Debian's docker-compose 1.29 here).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
ENV_EXAMPLE = INFRA / ".env.example"
BIN = Path(sys.executable).parent

SCHEDULER = "tcp://dask-scheduler:8786"
PIPELINE_SERVICES = ("dask-worker", "dask-cuda-worker", "prefect-worker", "bif-serve", "bif")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict:
    return _compose()["services"]


def _default(value: str) -> str:
    """``${VAR:-default}`` -> default; anything else unchanged."""
    m = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return m.group(1) if m else value


def _argv(service: dict) -> list[str]:
    """The full command line of a service: entrypoint + command, as a list."""
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value is None:
            continue
        parts += shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
    return parts


def _subcommand(argv: list[str]) -> tuple[str, ...]:
    """Leading words of a CLI call: ('dask', 'worker') for `dask worker tcp://... --nthreads 1`."""
    words = []
    for tok in argv:
        if tok.startswith("-") or "://" in tok or "$" in tok or "/" in tok:
            break
        words.append(tok)
    return tuple(words)


def _options(argv: list[str]) -> list[str]:
    return [tok.split("=", 1)[0] for tok in argv if tok.startswith("--")]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _our_image_services() -> dict[str, dict]:
    return {name: s for name, s in _services().items() if str(s.get("image", "")).startswith("bif-pipeline:")}


def _dockerfile_cmds() -> list[list[str]]:
    """The image's CMD and HEALTHCHECK command lines."""
    text = DOCKERFILE.read_text()
    cmd = yaml.safe_load(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    health = re.search(r"^HEALTHCHECK .*? CMD (.*?)(?: >.*)?$", text, re.M).group(1)
    return [cmd, shlex.split(health)]


def test_required_services_and_their_commands():
    svc = _services()
    for name in ("postgres", "prefect-server", "minio", "minio-setup", "dask-scheduler", "dask-worker",
                 "dask-cuda-worker", "prefect-worker", "bif-serve"):
        assert name in svc, f"service {name} missing from {COMPOSE}"

    server = svc["prefect-server"]
    assert _subcommand(_argv(server)) == ("prefect", "server", "start")
    url = _env(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert re.fullmatch(r"postgresql\+asyncpg://\$\{POSTGRES_USER:\?[^}]*\}:\$\{POSTGRES_PASSWORD:\?[^}]*\}"
                        r"@postgres:5432/\$\{POSTGRES_DB:-prefect\}", url), url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"

    assert _default(svc["minio"]["image"]).startswith("minio/minio:")
    setup = svc["minio-setup"]
    assert _default(setup["image"]).startswith("minio/mc:")
    assert setup["entrypoint"] == ["/bin/sh", "-ec"]
    (script,) = setup["command"]
    assert 'mc mb --ignore-existing "local/$$BIF_BUCKET"' in script
    assert "mc admin user add" in script and "mc admin policy attach" in script
    assert setup["depends_on"]["minio"]["condition"] == "service_healthy"
    # the one-shot script parses as POSIX sh once compose turns $$ into $
    res = subprocess.run(["sh", "-n", "-c", script.replace("$$", "$")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert setup["restart"] == "no"

    assert _argv(svc["dask-scheduler"])[:2] == ["dask", "scheduler"]
    assert "--port" in _argv(svc["dask-scheduler"]) and "8786" in _argv(svc["dask-scheduler"])

    cpu = _argv(svc["dask-worker"])
    assert cpu[:3] == ["dask", "worker", SCHEDULER]
    assert cpu[cpu.index("--nthreads") + 1] == "1"

    gpu = svc["dask-cuda-worker"]
    argv = _argv(gpu)
    assert argv[:4] == ["dask", "cuda", "worker", SCHEDULER]
    assert argv[argv.index("--resources") + 1] == "GPU=1"
    assert gpu["profiles"] == ["gpu"]
    assert gpu["image"].endswith("-cuda") and gpu["build"]["args"]["VARIANT"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]

    worker = _argv(svc["prefect-worker"])
    assert worker[:3] == ["prefect", "worker", "start"]
    assert worker[worker.index("--type") + 1] == "process"
    assert worker[worker.index("--pool") + 1] == "${BIF_WORK_POOL:-bif-process}"
    assert "profiles" not in svc["prefect-worker"]  # the default way to run deployments
    assert _subcommand(_argv(svc["bif-serve"])) == ("bif", "serve") and svc["bif-serve"]["profiles"] == ["serve"]

    # the digits config on MinIO points at this scheduler and this bucket
    cfg = yaml.safe_load((INFRA / "digits-minio.yaml").read_text())
    assert cfg["compute"]["address"] == SCHEDULER
    assert cfg["output"].startswith("s3://bif/") and cfg["checkpoint"].startswith("s3://bif/")
    assert cfg["storage_options"] == {}


def test_pipeline_containers_get_ambient_credentials_and_the_prefect_api():
    svc = _services()
    for name in PIPELINE_SERVICES:
        env = _env(svc[name])
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000", name
        assert env["AWS_ACCESS_KEY_ID"].startswith("${BIF_S3_ACCESS_KEY:?"), name
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${BIF_S3_SECRET_KEY:?"), name
        assert env["OMP_NUM_THREADS"] == "1", name
        assert env["NUMBA_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE", name
    for name, service in svc.items():
        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 unless the image's Dask config drops it;
        # an empty value is worse (glibc reads "" as 0), so no service may set it at all.
        assert "MALLOC_TRIM_THRESHOLD_" not in _env(service), name


def test_depends_on_waits_for_health_or_completion():
    svc = _services()
    for name, service in svc.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in svc, (name, dep)
            cond = spec["condition"]
            assert cond in ("service_healthy", "service_completed_successfully"), (name, dep, cond)
            if cond == "service_healthy":
                assert "healthcheck" in svc[dep], f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            else:
                assert svc[dep].get("restart") == "no", f"{dep} is a one-shot job and must not restart"


def test_every_image_is_pinned():
    svc = _services()
    for name, service in svc.items():
        image = _default(service["image"])
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: {image!r}"
        if repo == "bif-pipeline":
            assert service["build"]["dockerfile"] == "infra/Dockerfile" and service["build"]["context"] == ".."
        elif repo.startswith("minio/"):
            assert re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag), image
        else:
            assert re.fullmatch(r"\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?", tag), image
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert len(bases) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", bases[0]), bases


def test_no_secret_is_inlined():
    text = COMPOSE.read_text()
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    secret_names = [k for k in example if re.search(r"PASSWORD|SECRET|_KEY$|_USER$", k)]
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "BIF_S3_SECRET_KEY", "BIF_S3_ACCESS_KEY"} <= set(secret_names)
    for key in secret_names:
        if re.search(r"PASSWORD|SECRET", key):
            assert example[key] not in text, f"the value of {key} from .env.example is written into the compose file"
        # required, never defaulted: `${KEY:-value}` would inline a value
        assert f"${{{key}:-" not in text and f"${{{key}}}" not in text, key
    for name, service in _services().items():
        for key, value in _env(service).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|TOKEN", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), f"{name}: {key}={value!r} is not a required variable"
    # the real env file stays out of git and out of the image's build context
    assert "infra/.env" in (ROOT / ".gitignore").read_text().split()
    assert "infra/.env" in (ROOT / ".dockerignore").read_text().split()


def test_dockerfile_installs_pinned_torch_then_the_constraints():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^FROM torch-\$\{VARIANT\} AS final$", text, re.M)
    assert {"torch-cpu", "torch-cuda"} <= set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    versions = set(re.findall(r"^ARG TORCH_VERSION=(\S+)$", text, re.M))
    assert versions == {"2.13.0"}, versions
    assert '"torch==2.13.0"' in (ROOT / "Makefile").read_text()  # the same pin as `make install`
    cpu = text.split("AS torch-cpu", 1)[1].split("\nFROM ", 1)[0]
    assert "ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" in cpu
    assert 'pip install --no-deps --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"' in cpu
    cuda = text.split("AS torch-cuda", 1)[1].split("\nFROM ", 1)[0]
    assert 'pip install --no-deps "dask-cuda==${DASK_CUDA_VERSION}"' in cuda
    final = text.split("AS final", 1)[1]
    assert "pip install -c infra/constraints.txt /app" in final
    assert "COPY infra/dask/bif.yaml /etc/dask/bif.yaml" in final
    assert re.search(r"^ENV PYTHONDONTWRITEBYTECODE", text, re.M)
    for setting in ("PREFECT_SERVER_ANALYTICS_ENABLED=false", "DO_NOT_TRACK=1"):
        assert setting in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users == ["bif"], users
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    assert (INFRA / "pip-check.sh").exists() and "infra/pip-check.sh" in final


def test_every_command_the_containers_run_exists_here():
    """`<cmd> --help` for each bif/prefect/dask call of the compose file and the Dockerfile, with
    the options it passes; dask-cuda is checked only when installed (it is not in the CPU venv)."""
    calls: dict[tuple[str, ...], set[str]] = {}
    for name, service in _our_image_services().items():
        argv = _argv(service)
        if service.get("entrypoint") == ["bif"]:
            continue  # the CLI service: its command is whatever the user passes
        assert argv[0] in ("bif", "prefect", "dask"), f"{name} runs {argv[0]!r}"
        calls.setdefault(_subcommand(argv), set()).update(_options(argv))
    for argv in _dockerfile_cmds():
        calls.setdefault(_subcommand(argv), set()).update(o for o in _options(argv) if o != "--help")
    assert ("dask", "cuda", "worker") in calls and ("prefect", "worker", "start") in calls

    import importlib.util

    have_dask_cuda = importlib.util.find_spec("dask_cuda") is not None
    bif_commands = _bif_subcommands()
    procs = {}
    for words, options in calls.items():
        if words == ("dask", "cuda", "worker") and not have_dask_cuda:
            assert {"--resources", "--nthreads"} <= options
            continue
        if words[0] == "bif" and len(words) > 1:
            assert words[1] in bif_commands, f"compose runs `{' '.join(words)}`, which bif does not have"
        exe = BIN / words[0]
        assert exe.exists(), f"{words[0]} is not installed next to {sys.executable}"
        procs[words] = subprocess.Popen([str(exe), *words[1:], "--help"], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=_clean_env(),
                                        cwd=ROOT)
    for words, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{' '.join(words)} --help failed:\n{out}"
        for option in calls[words]:
            assert option in out, f"{' '.join(words)} has no option {option}"


def _bif_subcommands() -> set[str]:
    from bif.flows.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001
    return set(action.choices)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and not k.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_image_dask_config_drops_the_nanny_malloc_trim_setting():
    import dask

    collected = dask.config.collect(paths=[str(INFRA / "dask")], env={})
    environ = collected["distributed"]["nanny"]["pre-spawn-environ"]
    assert "MALLOC_TRIM_THRESHOLD_" in environ and environ["MALLOC_TRIM_THRESHOLD_"] is None
    assert environ["OMP_NUM_THREADS"] == 1
    import distributed  # noqa: F401  (registers Dask's defaults: MALLOC_TRIM_THRESHOLD_ = 65536)

    merged = dask.config.merge(dask.config.config, collected)["distributed"]["nanny"]["pre-spawn-environ"]
    spawned = {k: v for k, v in merged.items() if v is not None}  # what the nanny exports (None = unset)
    assert "MALLOC_TRIM_THRESHOLD_" not in spawned and spawned["OMP_NUM_THREADS"] == 1
    # the image's workers get the same thread caps as a LocalCluster that bif.flows.runtime starts
    assert spawned["NUMBA_NUM_THREADS"] == 1 and spawned["OMP_WAIT_POLICY"] == "PASSIVE"
    # and its preload (dask_setup: glibc keeps freed memory for reuse, bif.flows.runtime.tune_malloc)
    assert collected["distributed"]["worker"]["preload"] == ["bif.flows.runtime"]
    # and its housekeeping intervals (bif.flows.runtime.HOUSEKEEPING)
    from bif.flows.runtime import HOUSEKEEPING

    image = dask.config.merge(dask.config.config, collected)
    for key, value in HOUSEKEEPING.items():
        node = image
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_ambient_s3_variables_are_enough_for_the_pipeline(moto_server, s3_bucket):
    """The containers get only AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL_S3:
    with those and `storage_options: {}`, the pipeline's fsspec writes and pyarrow reads work."""
    from conftest import S3_KEY, S3_SECRET

    bucket, _ = s3_bucket
    env_names = set(_env(_services()["dask-worker"]))
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"} <= env_names
    env = _clean_env() | {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                          "AWS_ENDPOINT_URL_S3": moto_server, "AWS_DEFAULT_REGION": "us-east-1"}
    code = (
        "import sys, fsspec, pandas as pd\n"
        "u = sys.argv[1]\n"
        "with fsspec.open(u + '/x.bin', 'wb') as f: f.write(b'payload')\n"
        "pd.DataFrame({'loss': [0.5, 1.5]}).to_parquet(u + '/t.parquet')\n"
        "print(fsspec.open(u + '/x.bin', 'rb').open().read().decode(), pd.read_parquet(u + '/t.parquet').loss.sum())\n"
    )
    res = subprocess.run([sys.executable, "-c", code, f"s3://{bucket}/ambient"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["payload", "2.0"]


def _compose_clients() -> list[list[str]]:
    clients = []
    if shutil.which("docker-compose"):
        clients.append(["docker-compose"])
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        clients.append(["docker", "compose"])
    return clients


@pytest.mark.skipif(not _compose_clients(), reason="no docker-compose / docker compose client installed "
                    "(apt-get install docker-compose gives v1.29, which validates without a daemon)")
def test_compose_config_validates(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    no_secrets = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_USER", "POSTGRES_PASSWORD")}
    runs = []
    for client in _compose_clients():  # both calls of every client at once: compose v1 starts slowly
        profiles = ["--profile", "gpu", "--profile", "serve", "--profile", "cli"]
        full = [*client, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), *profiles, "config"]
        bare = [*client, "-f", str(COMPOSE), "--env-file", str(empty), "config"]
        runs.append((client,
                     subprocess.Popen(full, cwd=INFRA, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                     subprocess.Popen(bare, cwd=INFRA, env=no_secrets, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)))
    for client, full, bare in runs:
        out, err = full.communicate(timeout=120)
        assert full.returncode == 0, f"{' '.join(client)} config: {err}"
        resolved = yaml.safe_load(out)["services"]
        assert set(resolved) == set(_services())
        assert resolved["dask-worker"]["deploy"]["replicas"] == 2
        assert resolved["dask-cuda-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
        assert resolved["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] == (
            "postgresql+asyncpg://prefect:change-me-postgres@postgres:5432/prefect")
        # a missing secret stops compose with the variable's name instead of starting half-configured
        _, err = bare.communicate(timeout=120)
        assert bare.returncode != 0 and "set POSTGRES_" in err and "in infra/.env" in err, err


@pytest.mark.slow
def test_digits_minio_config_runs_on_the_compose_topology(tmp_path, moto_server, s3_bucket, prefect_api_url):
    """The stack in miniature, from the compose file's own commands: `dask scheduler` and two
    `dask worker` processes with the image's Dask config, ambient S3 variables only, a Prefect
    API; then `bif example` and `bif run infra/digits-minio.yaml` as the README runs them."""
    import socket
    import time

    import fsspec
    from distributed import Client

    from conftest import S3_KEY, S3_SECRET

    bucket, opts = s3_bucket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _clean_env() | {"PREFECT_API_URL": prefect_api_url, "DASK_CONFIG": str(INFRA / "dask"),
                          "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                          "AWS_ENDPOINT_URL_S3": moto_server, "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    svc = _services()
    address = f"tcp://127.0.0.1:{port}"

    def local(argv: list[str]) -> list[str]:  # the compose command, with this machine's addresses
        out = [address if a == SCHEDULER else _default(a) for a in argv]
        return [str(BIN / out[0]), *out[1:]]

    scheduler = local(_argv(svc["dask-scheduler"]))
    scheduler[scheduler.index("--host") + 1] = "127.0.0.1"
    scheduler[scheduler.index("--port") + 1] = str(port)
    scheduler[scheduler.index("--dashboard-address") + 1] = ":0"
    worker = local(_argv(svc["dask-worker"]))
    i = worker.index("--memory-limit")
    worker[i:i + 2] = ["--memory-limit", "2GiB"]
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("scheduler", "worker-0", "worker-1")]
    procs = [subprocess.Popen(scheduler, env=env, cwd=tmp_path, stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        time.sleep(2)
        procs += [subprocess.Popen(worker, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
                  for log in logs[1:]]
        with Client(address, timeout=60) as client:
            try:
                client.wait_for_workers(2, timeout=120)
            except Exception:
                pytest.fail("workers did not join:\n" + "\n".join(f.name + ":\n" + open(f.name).read()[-2000:] for f in logs))
            worker_env = client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
            transitions_before = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
        assert all(v == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"} for v in worker_env.values()), worker_env

        def refaults() -> int:  # page faults of 3 x 20 MiB built again after a free, on a task's thread
            import resource

            first = [b"\x01" * (20 << 20) for _ in range(3)]
            del first
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            again = [b"\x01" * (20 << 20) for _ in range(3)]
            del again
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        with Client(address, timeout=60) as client:  # the image's preload tuned glibc (15,360 faults otherwise)
            faults = client.gather([client.submit(refaults, pure=False, workers=[w])
                                    for w in client.scheduler_info()["workers"]])
        assert len(faults) == 2 and max(faults) < 300, faults

        cfg = yaml.safe_load((INFRA / "digits-minio.yaml").read_text())
        checkpoint = cfg["checkpoint"].replace("s3://bif/", f"s3://{bucket}/")
        output = cfg["output"].replace("s3://bif/", f"s3://{bucket}/")
        bif = str(BIN / "bif")
        res = subprocess.run([bif, "example", "digits", checkpoint, "--epochs", "30"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        res = subprocess.run(
            [bif, "run", "infra/digits-minio.yaml", "--no-progress", "--output", output,
             "--set", f"checkpoint={checkpoint}", "--set", f"compute.address={address}",
             "--set", "sampler.num_chains=2", "--set", "sampler.num_draws=20", "--set", "sampler.num_burnin_steps=10",
             "--set", "sampler.draws_per_block=10"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        fs = fsspec.filesystem("s3", **opts)
        import json

        manifest = json.loads(fs.cat(f"{output}/manifest.json"))
        assert manifest["status"] == "complete"
        assert S3_SECRET not in json.dumps(manifest)
        assert fs.exists(f"{output}/topk.parquet")
        with Client(address, timeout=60) as client:  # the chains ran on these workers, not a LocalCluster
            transitions = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
        assert transitions > transitions_before + 10, (transitions_before, transitions)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        for f in logs:
            f.close()
