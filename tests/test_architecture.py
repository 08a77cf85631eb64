"""Rules of the layout, enforced (docs/architecture.md): one import name, dependencies point one way."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from bif.flows.cli import build_parser, main
from bif.config import config_reference, load_config
from bif.errors import ConfigError


MATH_MODULES = ["bif.sampling.chain", "bif.sampling.kernels", "bif.sampling.measure", "bif.moments", "bif.block_ops",
                "bif.quality.kernels", "bif.examples.linear", "bif.examples.digits"]
_BANNED = "('prefect', 'dask', 'distributed', 'fsspec', 's3fs')"


def _orchestration_after_import(modules: list[str]) -> list[list[str]]:
    """In one fresh interpreter, import ``modules`` in order; after each, the banned modules loaded so far."""
    code = ("import importlib, json, sys\n"
            f"out = []\nfor m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            f"    out.append([b for b in {_BANNED} if b in sys.modules])\n"
            "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return __import__("json").loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def math_imports() -> dict[str, list[str]]:
    """Module -> orchestration modules its import loads, exactly as in a fresh interpreter of its own.

    One interpreter imports them all in order (one torch import instead of six); while nothing banned is
    loaded, a module's verdict there is the one it would get alone. Once something is, each later module
    gets a fresh interpreter of its own, so every module is still judged alone."""
    seq = _orchestration_after_import(MATH_MODULES)
    out = {}
    for i, m in enumerate(MATH_MODULES):
        clean_before = i == 0 or not seq[i - 1]
        out[m] = seq[i] if clean_before else _orchestration_after_import([m])[0]
    return out


@pytest.mark.parametrize("module", MATH_MODULES)
def test_math_modules_import_no_orchestration(module, math_imports):
    assert math_imports[module] == [], f"importing {module} loads {math_imports[module]}"


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


REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("prefect", "prefect_dask", "distributed")


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _hits(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for mod in _imports(path):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(REPO)} imports {mod}")
    return bad


def test_one_import_name():
    """Rule 1: the distribution installs `bif` only; flows/ and tasks/ are bif.flows / bif.tasks."""
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "bif" or p.startswith("bif.") for p in setup["packages"]), setup["packages"]
    assert setup["package-dir"] == {"bif": "bif", "bif.flows": "flows", "bif.tasks": "tasks"}
    # from outside the checkout, the installed package provides bif.flows / bif.tasks and nothing named tasks / flows
    code = ("import importlib.util as u, bif.flows.cli, bif.tasks.steps; "
            "print(u.find_spec('tasks') is None and u.find_spec('flows') is None)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stdout + res.stderr


def test_library_is_free_of_orchestration():
    """Rule 2: modules under bif/ import no prefect, prefect_dask or distributed, and never the flows."""
    assert _hits("bif", ORCHESTRATION + ("bif.flows",)) == []


def test_tasks_never_import_the_flows():
    """Rule 3."""
    assert _hits("tasks", ("bif.flows",)) == []


_STORE_IMPORTS = ("pyarrow.parquet", "zarr")
_STORE_CALLS = ("read_parquet", "to_parquet", "to_zarr", "open_zarr", "get_fs")


def _storage_uses(path: Path) -> list[str]:
    """Parquet / Zarr imports and calls, ``pq.`` uses and ``get_fs`` calls in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = [f"imports {m}" for m in sorted(_imports(path)) if any(m == b or m.startswith(b + ".") for b in _STORE_IMPORTS)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if name in _STORE_CALLS:
                found.append(f"calls {name}() at line {node.lineno}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pq":
            found.append(f"uses pq.{node.attr} at line {node.lineno}")
    return found


def test_one_run_store_owns_parquet_and_zarr():
    """Rule 4: only bif/store/ touches Parquet or Zarr, or resolves a filesystem (get_fs); everything
    else goes through bif.store.RunStore (or bif.store.tables for tables outside a run)."""
    bad = []
    for folder in ("bif", "tasks", "flows"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel.parts[:2] == ("bif", "store"):
                continue
            bad += [f"{rel} {use}" for use in _storage_uses(path)]
    assert bad == []
    # the scan sees what it looks for: the store itself does all of it
    store_uses = " ".join(u for p in sorted((REPO / "bif" / "store").rglob("*.py")) for u in _storage_uses(p))
    for what in ("imports pyarrow.parquet", "imports zarr", "calls to_zarr()", "calls open_zarr()", "calls get_fs()"):
        assert what in store_uses, what
