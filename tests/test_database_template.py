"""The kept empty Prefect database that seeds fresh Prefect homes (flows/prefect_server.py), on SQLite files made
here: what counts as a template, when a home is seeded, and that a damaged or altered copy is never used.

tests/test_server.py starts real servers on two fresh homes: the first leaves the template, the second starts from it.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bif.flows import prefect_server as ps

VERSION = "9.9.9-test"


def _db(path: Path, *, rows: dict[str, int] | None = None, stamp: bool = True, user_version: int = 0) -> Path:
    """A small SQLite file shaped like a migrated Prefect database: a stamp, a block registry, a flow table."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    if stamp:
        con.execute("INSERT INTO alembic_version VALUES ('abc123')")
    con.execute("CREATE TABLE block_type (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO block_type (name) VALUES ('secret')")  # Prefect's built-in registry: allowed
    con.execute("CREATE TABLE flow (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    con.execute("CREATE TABLE variable (id INTEGER PRIMARY KEY, name TEXT, value TEXT)")
    for table, n in (rows or {}).items():
        cols = "name, value" if table == "variable" else "name"
        con.executemany(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(cols.split(',')))})",
                        [tuple(f"v{i}" for _ in cols.split(",")) for i in range(n)])
    con.execute(f"PRAGMA user_version = {user_version}")
    con.commit()
    con.close()
    return path


def _problem(path: Path) -> str | None:
    con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return ps._template_problem(con)
    finally:
        con.close()


def _user_version(path: Path) -> int:
    con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIF_CACHE_DIR", str(tmp_path / "cache"))
    for k in [k for k in __import__("os").environ if k.startswith("PREFECT_") and "DATABASE" in k]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    return tmp_path / "cache"


def test_what_counts_as_a_template(tmp_path):
    assert _problem(_db(tmp_path / "empty.db")) is None
    assert _problem(_db(tmp_path / "flow.db", rows={"flow": 1})) == "rows in flow"
    assert _problem(_db(tmp_path / "both.db", rows={"flow": 2, "variable": 1})) == "rows in flow, variable"
    assert _problem(_db(tmp_path / "unstamped.db", stamp=False)) == "no migration stamp"


def test_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("BIF_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ps.cache_dir() == tmp_path / "xdg" / "bif"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ps.cache_dir() == Path.home() / ".cache" / "bif"
    monkeypatch.setenv("BIF_CACHE_DIR", str(tmp_path / "mine"))
    assert ps.database_template("3.0.0") == tmp_path / "mine" / "prefect-db" / "prefect-3.0.0.db"


def test_a_fresh_home_gets_a_copy_and_a_used_one_is_left_alone(cache, tmp_path):
    tpl = ps.database_template(VERSION)
    tpl.parent.mkdir(parents=True)
    _db(tpl, user_version=7)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert ps._seed_database(fresh / "prefect.db", VERSION)
    assert _user_version(fresh / "prefect.db") == 7 and _problem(fresh / "prefect.db") is None
    assert sorted(p.name for p in fresh.iterdir()) == ["prefect.db"]  # no -wal/-shm/seed files left beside it
    used = tmp_path / "used"
    used.mkdir()
    _db(used / "prefect.db", rows={"flow": 3}, user_version=1)
    assert not ps._seed_database(used / "prefect.db", VERSION)
    assert _user_version(used / "prefect.db") == 1
    other = tmp_path / "other"
    other.mkdir()
    assert not ps._seed_database(other / "prefect.db", "0.0.1")  # no template for another Prefect version
    assert not (other / "prefect.db").exists()


@pytest.mark.parametrize("setting", ["env", "profiles"])
def test_a_home_with_its_own_database_setting_is_never_seeded(cache, tmp_path, monkeypatch, setting):
    tpl = ps.database_template(VERSION)
    tpl.parent.mkdir(parents=True)
    _db(tpl)
    home = tmp_path / "home"
    home.mkdir()
    if setting == "env":
        monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/elsewhere.db")
    else:
        (home / "profiles.toml").write_text('[profiles.default]\nPREFECT_API_DATABASE_CONNECTION_URL = "x"\n')
    assert ps._default_database(home) is None  # so _claim_server seeds nothing


@pytest.mark.parametrize("damage", ["garbage", "rows"])
def test_a_damaged_or_altered_template_is_dropped_not_used(cache, tmp_path, damage):
    tpl = ps.database_template(VERSION)
    tpl.parent.mkdir(parents=True)
    if damage == "garbage":
        tpl.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)
    else:  # a copy that somehow holds a user's data
        _db(tpl, rows={"variable": 1})
    home = tmp_path / "home"
    home.mkdir()
    assert not ps._seed_database(home / "prefect.db", VERSION)
    assert not tpl.exists()  # dropped: the next fresh home creates its database as Prefect does
    assert sorted(p.name for p in home.iterdir()) == []


def test_only_an_empty_database_is_kept(cache, tmp_path):
    empty = _db(tmp_path / "empty.db", user_version=5)
    assert ps._keep_template(empty, VERSION)
    tpl = ps.database_template(VERSION)
    assert _user_version(tpl) == 5 and _problem(tpl) is None
    used = _db(tmp_path / "used.db", rows={"flow": 1}, user_version=6)
    assert not ps._keep_template(used, VERSION)
    assert _user_version(tpl) == 5  # the kept one stays; nothing of the used database reached the cache
    assert sorted(p.name for p in tpl.parent.iterdir()) == [tpl.name]
    assert not ps._keep_template(tmp_path / "missing.db", VERSION)  # never raises
