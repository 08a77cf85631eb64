"""Dependencies point one way: the math imports no Prefect, Dask or fsspec; the CLI helps."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bif.cli import build_parser, main
from bif.config import config_reference, load_config
from bif.errors import ConfigError


@pytest.mark.parametrize("module", ["tasks.sampler", "tasks.moments", "bif.examples.linear", "bif.examples.digits"])
def test_math_modules_import_no_orchestration(module):
    code = (f"import sys, {module}; bad = [m for m in ('prefect', 'dask', 'distributed', 'fsspec', 's3fs') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for word in ("run", "show", "example", "keys", "PREFECT_API_URL", "--set sampler.num_draws=400"):
        assert word in out


def test_keys_documents_every_field():
    ref = config_reference()
    for key in ("step_size", "nbeta", "gamma", "num_chains", "train_block_size", "pooling", "address"):
        line = next(l for l in ref.splitlines() if l.strip().startswith(key + ":"))
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 10


def test_overrides_and_hash(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("problem: bif.examples.linear:build\nsampler: {num_draws: 10}\n")
    a = load_config(p)
    b = load_config(p, overrides=["sampler.num_draws=400", "covariance.topk=3"], output="s3://b/x")
    assert b.sampler.num_draws == 400 and b.covariance.topk == 3 and b.output == "s3://b/x"
    assert a.hash() != b.hash()
    assert load_config(p, overrides=["compute.n_workers=2"], output="elsewhere").hash() == a.hash()
    with pytest.raises(ConfigError, match="unknown config key 'sampler.stepsize'"):
        load_config(p, overrides=["sampler.stepsize=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, overrides=["nonsense"])
    assert build_parser().parse_args(["run", str(p), "--set", "a.b=1"]).set == ["a.b=1"]
