"""The problem interface: dataclass, dict or attribute object; checkpoints load with weights_only."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from bif.errors import CheckpointError, ProblemError
from bif.examples import digits, linear
from bif.problem import Problem, as_problem, load_checkpoint, load_problem, model_hash


def test_dict_and_attribute_objects_work_like_the_dataclass():
    p = linear.build(n=10, d=2, m=3)
    as_dict = as_problem({"model": p.model, "train": p.train, "query": p.query, "loss": p.loss,
                          "loss_bounds": (0.0, 5.0)})
    as_obj = as_problem(types.SimpleNamespace(model=p.model, train=p.train, query=p.query, loss=p.loss))
    assert isinstance(as_dict, Problem) and as_dict.loss_bounds == (0.0, 5.0)
    assert as_obj.fit is None and len(as_obj.query) == 3
    with pytest.raises(ProblemError, match=r"without \['loss'\]"):
        as_problem({"model": p.model, "train": p.train, "query": p.query})
    with pytest.raises(ProblemError, match="torch.nn.Module"):
        as_problem({"model": "nope", "train": p.train, "query": p.query, "loss": p.loss})


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    digits.save_checkpoint(str(tmp_path / "d.pt"), epochs=5)
    prob = load_problem("bif.examples.digits:build", {"n_train": 50})
    before = model_hash(prob.model)
    sha = load_checkpoint(prob.model, str(tmp_path / "d.pt"))
    assert len(sha) == 64 and model_hash(prob.model) != before
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(prob.model, str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(prob.model, str(tmp_path / "missing.pt"))


def test_factory_args_are_checked():
    with pytest.raises(ProblemError, match="rejected problem_args"):
        load_problem("bif.examples.linear:build", {"bogus": 1})
    with pytest.raises(ProblemError, match="has no attribute 'nope'"):
        load_problem("bif.examples.linear:nope")


def test_a_factory_that_raises_is_a_problem_error_naming_it():
    with pytest.raises(ProblemError, match=r"problem factory 'fault_problems:raising_factory' raised RuntimeError: "
                                           r"boom: the dataset server is down \(called with problem_args \{\}\)"):
        load_problem("fault_problems:raising_factory")


def test_a_folder_of_the_working_directory_that_hides_a_package_is_named(tmp_path, monkeypatch):
    """A project's own `bif/` folder of configs (no __init__.py) in the working directory, which Dask workers have on
    sys.path, is imported as the namespace package `bif` in front of an editable install: `bif.examples.digits` is
    then not found, and the error names the folder (found running the README's commands from such a directory)."""
    (tmp_path / "pkgx" / "examples").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    folder = types.ModuleType("pkgx")
    folder.__path__ = [str(tmp_path / "pkgx")]  # what the path finder makes of a folder without __init__.py
    folder.__file__ = None
    monkeypatch.setitem(sys.modules, "pkgx", folder)
    try:
        with pytest.raises(ProblemError) as err:
            load_problem("pkgx.examples.digits:build")
        assert f"'pkgx' was imported from the folder {str(tmp_path / 'pkgx')!r}, which has no __init__.py" \
            in str(err.value)
        # a namespace package that lives elsewhere (an installed one) and a missing regular module get no such hint
        sys.modules.pop("pkgx.examples", None)  # the folder pkgx/examples/ became one too, on the way
        folder.__path__ = [str(tmp_path.parent)]
        with pytest.raises(ProblemError) as err:
            load_problem("pkgx.examples.digits:build")
        assert "no __init__.py" not in str(err.value)
    finally:
        sys.modules.pop("pkgx.examples", None)
    with pytest.raises(ProblemError) as err:
        load_problem("bif.examples.nothing_here:build")
    assert "cannot import problem module 'bif.examples.nothing_here'" in str(err.value)
    assert "no __init__.py" not in str(err.value)


def test_tensors_hash_sees_values_dtypes_and_shapes():
    from bif.problem import tensors_hash

    x = torch.arange(6, dtype=torch.float32)
    base = tensors_hash([x, {"y": torch.ones(2)}]).hexdigest()
    assert tensors_hash([x.clone(), {"y": torch.ones(2)}]).hexdigest() == base  # content, not identity
    assert tensors_hash([x.double(), {"y": torch.ones(2)}]).hexdigest() != base
    assert tensors_hash([x.reshape(2, 3), {"y": torch.ones(2)}]).hexdigest() != base
    x2 = x.clone()
    x2[5] = 5.0000005
    assert tensors_hash([x2, {"y": torch.ones(2)}]).hexdigest() != base
