"""A checkpoint enters a run by content, not by path: a moved checkpoint resumes its run, a replaced one does not.

The config hash covers problem, problem_args and sampler (``RunConfig.hash``); the checkpoint
is part of the run's identity through its sha256 (``bif.tasks.pipeline.run_identity``).
"""
from __future__ import annotations

import shutil

import pytest

from bif import schema as S
from bif.errors import RunConflictError
from bif.store.manifest import read_manifest
from bif.tasks import pipeline
from test_faults import _cfg, _save_checkpoint, _snapshot


def test_config_hash_ignores_the_checkpoint_path_but_not_the_sampler(tmp_path):
    a = _cfg(tmp_path / "run", None, checkpoint=str(tmp_path / "a.pt"))
    b = _cfg(tmp_path / "run", None, checkpoint=str(tmp_path / "elsewhere" / "b.pt"))
    assert a.hash() == b.hash()
    assert a.hash() != _cfg(tmp_path / "run", None, checkpoint=str(tmp_path / "a.pt"),
                            sampler={"num_draws": 80}).hash()
    # a complete run is recognised whatever path its checkpoint has now; any other setting differs
    pa, pb = a.public_dict(), b.public_dict()
    assert pipeline._same_run(pa, pb) and not pipeline._same_run(pa, pb | {"covariance": {}})
    assert not pipeline._same_run(None, pb)


def test_moved_checkpoint_resumes_the_half_finished_run_and_a_replaced_one_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    old = _save_checkpoint(tmp_path / "ckpt" / "latest.pt")
    out = tmp_path / "run"
    cfg = _cfg(out, None, checkpoint=str(old))
    info = pipeline.prepare_run(cfg)
    first = pipeline.run_chain(cfg, 0, ref_train_loss_mean=info.ref_train_loss_mean)  # then the run was killed
    assert read_manifest(str(out))["status"] == S.STATUS_RUNNING and first.resumed_blocks == 0
    before = _snapshot(out)

    # the checkpoint moves (an archive job, another mount point): same bytes, new path
    (tmp_path / "archive").mkdir()
    new = tmp_path / "archive" / "step-1000.pt"
    shutil.move(old, new)
    moved = _cfg(out, None, checkpoint=str(new))
    again = pipeline.prepare_run(moved)
    assert (again.config_hash, again.checkpoint_sha256) == (info.config_hash, info.checkpoint_sha256)
    resumed = pipeline.run_chain(moved, 0, ref_train_loss_mean=again.ref_train_loss_mean)
    assert resumed.resumed_blocks == 3  # every committed block kept, none redrawn
    traces = lambda snap: {k: v for k, v in snap.items() if k.startswith(S.TRACES_DIR)}  # noqa: E731
    assert traces(_snapshot(out)) == traces(before)

    # other bytes under the moved path are refused, and the run is left untouched
    _save_checkpoint(new, shift=0.05)
    snap = _snapshot(out)
    with pytest.raises(RunConflictError, match=r"checkpoint_sha256 [0-9a-f]{64}, now [0-9a-f]{64}"):
        pipeline.prepare_run(moved)
    with pytest.raises(RunConflictError, match="chain 1 refuses to resume"):
        pipeline.run_chain(moved, 1, ref_train_loss_mean=info.ref_train_loss_mean)
    assert _snapshot(out) == snap
