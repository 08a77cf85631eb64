"""Storage of the LDS benchmark: retrained losses (the ground truth) and scores, as Parquet.

Layout under ``<output>/lds/<key>/`` where ``key`` is
:meth:`bif.evaluation.settings.LDSSettings.ground_truth_key` (a hash of problem, problem_args,
α, M, seeds and root seed; not of the checkpoint nor the methods):

```
settings.json                      what the key hashes, for humans
retrain/subset=M/rep=R.parquet     one retraining: query losses (written by one task; resume unit)
ground_truth.parquet               all retrainings: subset, rep, fit_seed, query, loss
subsets.parquet                    the subsets: subset, train (one row per included example)
results/<run>/lds.parquet          per-query LDS: method, query, lds
results/<run>/summary.json         per method: mean, stderr, seconds, query_seconds, peak_mb, warnings
```
A second run with the same key reads ``ground_truth.parquet`` and retrains nothing.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bif.evaluation.lds import GroundTruth, LDSResult, draw_subsets, lds, retrain_seed
from bif.evaluation.settings import LDSSettings
from bif.store.fs import join
from bif.store.tables import Folder
from bif.evaluation.scoring import Scored

if TYPE_CHECKING:
    from bif.problem import Problem

# Parquet column names, defined once
SUBSET = "subset"
REP = "rep"
FIT_SEED = "fit_seed"
QUERY = "query"
LOSS = "loss"
TRAIN = "train"
METHOD = "method"
LDS_COL = "lds"
GROUND_TRUTH_FILE = "ground_truth.parquet"
SUBSETS_FILE = "subsets.parquet"
SETTINGS_FILE = "settings.json"


@functools.lru_cache(maxsize=8)
def _cached_problem(spec: str, args_json: str, checkpoint: str | None) -> Problem:
    from bif.problem import load_problem  # here: the LDS command plans, reads and scores without torch

    return load_problem(spec, json.loads(args_json), checkpoint=checkpoint)


def cached_problem(spec: str, args: Mapping[str, Any], checkpoint: str | None = None) -> Problem:
    """``load_problem`` memoized per process (each Dask worker builds a problem once)."""
    return _cached_problem(spec, json.dumps(dict(args), sort_keys=True, default=str), checkpoint)


@dataclass(frozen=True)
class Plan:
    """Where the ground truth lives, the subsets, and which retrainings are still missing."""

    key: str
    root_uri: str
    masks: np.ndarray  # (M, n_train) bool
    n_query: int
    cached: bool  # ground_truth.parquet exists: nothing to retrain
    missing: tuple[tuple[int, int, int], ...] = field(default=())  # (subset, rep, fit_seed)


def retrain_path(root: str, subset: int, rep: int) -> str:
    return join(root, "retrain", f"subset={subset:05d}", f"rep={rep}.parquet")


def _retrain_file(subset: int, rep: int) -> str:
    """The retraining file's path inside the ground-truth folder."""
    return retrain_path("", subset, rep).lstrip("/")


def plan(output: str, problem_spec: str, problem_args: Mapping[str, Any], settings: LDSSettings, *,
         n_train: int, n_query: int, storage_options: Mapping[str, Any] | None = None) -> Plan:
    """Draw the subsets, locate the ground truth, and list retrainings without a file yet."""
    key = settings.ground_truth_key(problem_spec, dict(problem_args))
    masks = draw_subsets(n_train, num_subsets=settings.num_subsets, alpha=settings.alpha, seed=settings.seed)
    root_uri = join(output, "lds", key)
    folder = Folder(root_uri, storage_options)
    if folder.exists(GROUND_TRUTH_FILE):
        return Plan(key, root_uri, masks, n_query, cached=True)
    folder.write_json(SETTINGS_FILE, {"problem": problem_spec, "problem_args": dict(problem_args),
                                               **settings.model_dump(mode="json", include={
                                                   "alpha", "num_subsets", "num_seeds", "seed"})})
    missing = tuple((m, r, retrain_seed(settings.seed, m, r))
                    for m in range(settings.num_subsets) for r in range(settings.num_seeds)
                    if not folder.exists(_retrain_file(m, r)))
    return Plan(key, root_uri, masks, n_query, cached=False, missing=missing)


def write_retrain(root_uri: str, subset: int, rep: int, fit_seed: int, losses: np.ndarray, *,
                  storage_options: Mapping[str, Any] | None = None) -> None:
    """Commit one retraining's query losses (n_query,) atomically."""
    df = pd.DataFrame({SUBSET: np.int32(subset), REP: np.int32(rep), FIT_SEED: np.int64(fit_seed),
                       QUERY: np.arange(len(losses), dtype=np.int64), LOSS: np.asarray(losses, np.float64)})
    Folder(root_uri, storage_options).write_table(_retrain_file(subset, rep), df)


def consolidate(p: Plan, settings: LDSSettings, *, storage_options: Mapping[str, Any] | None = None) -> GroundTruth:
    """Gather every retraining file into ground_truth.parquet (+ subsets.parquet) and return it."""
    folder = Folder(p.root_uri, storage_options)
    frames = [folder.read_table(_retrain_file(m, r))
              for m in range(settings.num_subsets) for r in range(settings.num_seeds)]
    df = pd.concat(frames, ignore_index=True).sort_values([SUBSET, REP, QUERY], ignore_index=True)
    m_idx, t_idx = np.nonzero(p.masks)
    folder.write_table(SUBSETS_FILE, pd.DataFrame({SUBSET: m_idx.astype(np.int32), TRAIN: t_idx}))
    folder.write_table(GROUND_TRUTH_FILE, df)  # written last: its presence marks completion
    return _to_ground_truth(df, p.masks, settings)


def read_ground_truth(p: Plan, settings: LDSSettings, *, storage_options: Mapping[str, Any] | None = None
                      ) -> GroundTruth:
    """Load the cached ground truth, checking it against the subsets drawn now."""
    folder = Folder(p.root_uri, storage_options)
    sub = folder.read_table(SUBSETS_FILE)
    masks = np.zeros_like(p.masks)
    masks[sub[SUBSET].to_numpy(), sub[TRAIN].to_numpy()] = True
    if not np.array_equal(masks, p.masks):
        raise ValueError(f"cached subsets at {p.root_uri} differ from the ones drawn now; delete that folder")
    return _to_ground_truth(folder.read_table(GROUND_TRUTH_FILE), p.masks, settings)


def _to_ground_truth(df: pd.DataFrame, masks: np.ndarray, settings: LDSSettings) -> GroundTruth:
    df = df.sort_values([SUBSET, REP, QUERY])
    n_query = int(df[QUERY].max()) + 1
    losses = df[LOSS].to_numpy().reshape(settings.num_subsets, settings.num_seeds, n_query)
    return GroundTruth(masks=masks, losses=losses)


@dataclass(frozen=True)
class MethodReport:
    """LDS and cost of one method."""

    method: str
    lds: float
    stderr: float
    seconds: float
    query_seconds: float
    peak_mb: float
    warnings: list[str] = field(default_factory=list)  # the method's warnings about its scores


def evaluate(gt: GroundTruth, scored: Iterable[Scored]) -> tuple[list[MethodReport], pd.DataFrame]:
    """LDS of each scored method against the ground truth: reports and per-query rows."""
    reports, rows = [], []
    for s in scored:
        res: LDSResult = lds(s.tau, gt.masks, gt.outputs)
        reports.append(MethodReport(s.name, res.mean, res.stderr, s.seconds, s.query_seconds, s.peak_mb,
                                    list(s.warnings)))
        rows.append(pd.DataFrame({METHOD: s.name, QUERY: np.arange(len(res.per_query)), LDS_COL: res.per_query}))
    return reports, pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=[METHOD, QUERY, LDS_COL])


def write_results(p: Plan, run_name: str, reports: list[MethodReport], per_query: pd.DataFrame,
                  extra: Mapping[str, Any], *, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write results/<run_name>/{lds.parquet, summary.json}; return the summary's URI."""
    folder = Folder(p.root_uri, storage_options)
    folder.write_table(join("results", run_name, "lds.parquet"), per_query)
    folder.write_json(join("results", run_name, "summary.json"), {"methods": [asdict(r) for r in reports], **dict(extra)})
    return join(p.root_uri, "results", run_name, "summary.json")


def read_summary(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    return Folder(uri, storage_options).read_json()
