"""Every JSON file a run writes is strict JSON (no NaN / Infinity): jq, DuckDB and JavaScript read it."""
from __future__ import annotations

import json
import math

import pytest

from bif import schema as S
from bif.store.fs import dumps_strict, get_fs, read_json, write_json


def _strict_load(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_is_strict_and_documents_infinite_bounds_as_null(tmp_path):
    fs, root = get_fs(str(tmp_path))
    write_json(fs, f"{root}/x.json", {"loss_bounds": (0.0, math.inf), "mcse": float("nan"),
                                      "nested": [{"v": -math.inf}, 1.5]})
    data = _strict_load((tmp_path / "x.json").read_text())
    assert data == {"loss_bounds": [0.0, None], "mcse": None, "nested": [{"v": None}, 1.5]}
    assert read_json(fs, f"{root}/x.json") == data
    with pytest.raises(ValueError, match="non-strict"):
        _strict_load(json.dumps({"x": math.inf}))  # the checker itself refuses Infinity
    assert "Infinity" not in dumps_strict({"a": [math.inf]})


@pytest.mark.e2e
def test_every_json_file_of_a_run_is_strict(linear_complete_run):
    """The JSON files of a complete linear run (the session's ``linear_complete_run``, tests/conftest.py)."""
    out = linear_complete_run.out
    assert linear_complete_run.manifest["status"] == S.STATUS_COMPLETE
    files = sorted(out.rglob("*.json"))
    names = {str(p.relative_to(out)) for p in files}
    assert {S.CONFIG_FILE, S.MANIFEST_FILE, f"{S.QUALITY_DIR}/{S.QUALITY_SUMMARY_FILE}"} <= names, names
    for p in files:
        _strict_load(p.read_text())  # raises on NaN / Infinity
    on_disk = _strict_load((out / S.MANIFEST_FILE).read_text())
    assert on_disk["run_info"]["loss_bounds"] == [0.0, None]  # null: unbounded above
