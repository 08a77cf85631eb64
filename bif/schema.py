"""Names of every on-disk column, file and layout, defined once.

Run layout under ``<output>`` (a local path or an fsspec URI):

```
config.json                         resolved config (credentials removed), its hash, the run's identity
manifest.json                       status, hashes, versions, timings; written last
lease.json                          while a run works: its owner, host, pid, expiry (bif/store/lease.py)
reference.parquet                   per-sample losses at the checkpoint w* (token runs: sequence loss = sum of its tokens)
traces/chain-C/block-B.parquet      per-sample losses, one row per (chain, draw, sample)
                                    (token runs: one row per (chain, draw, sample, position), valid tokens only)
tokens.parquet                      token runs: one row per valid token (split, sample, position, token, ref_loss)
topk_tokens.parquet                 token runs: per query token, its top-k train tokens by BIF in each sign
bif_tokens.zarr                     token runs with covariance.token_matrix: bif, bif_corr over
                                    (train_token, query_token); bif_seq_tok, bif_tok_seq (mixed levels)
health/chain-C/block-B.parquet      per-draw sampler health (distance to w*, mean losses)
state/chain-C/block-B.pt            chain state after block B (params, preconditioner, RNG)
bif.zarr                            xarray Dataset: bif, bif_corr over (train, query); train_constant, query_constant
topk.parquet                        top-k positive / negative train examples per query
quality/                            quality gates: GE results (*.json, *.md) and summary.json
diagnostics.parquet                 per-sample rank R-hat, bulk and tail ESS of the loss traces
report.html                         self-contained human-readable report (embedded PNGs)
```
``pandas.read_parquet(f"{output}/traces")`` reads every committed block as one table.
A block is committed when its ``traces`` file exists; ``health`` and ``state`` are
written before it, so a reader never sees half a block. The health file's Parquet metadata
holds the CRC32C of the trace file (``bif.traces_crc32c``, 8 hex digits; blocks committed before
2026-12-02 hold its sha256, ``bif.traces_sha256``); resumes and readers check it.

A run's identity (config.json ``identity``, also in manifest.json): ``checkpoint_sha256``
(the checkpoint file's bytes), ``model_sha256`` (the weights at w*), ``data_sha256`` (the
train and query sets as collated for the losses). A rerun or resume with another identity
is refused (see ``bif.tasks.pipeline.IDENTITY_KEYS``).

Every JSON file is strict JSON: a non-finite number is written as ``null``; in
``loss_bounds`` a ``null`` end is unbounded (``[0.0, null]`` = [0, inf)).
"""
from __future__ import annotations

import pyarrow as pa

# --- trace files -----------------------------------------------------------------
CHAIN = "chain"
DRAW = "draw"
SPLIT = "split"
SAMPLE = "sample"
LOSS = "loss"
TRAIN = "train"
QUERY = "query"
SPLITS = (TRAIN, QUERY)

POSITION = "position"  # token runs: the token's true index along T of the loss tensor (B, T)

#: Row order inside a trace file: split (train, then query), sample ascending, draw
#: ascending. One trace file therefore reshapes to (n_samples, n_draws) per split.
#: Token runs (loss (B, T)): split, sample, position ascending, then draw; valid tokens only
#: (bif.sampling.measure.Variables computes every offset).
TRACE_ROW_ORDER = (SPLIT, SAMPLE, DRAW)
TOKEN_TRACE_ROW_ORDER = (SPLIT, SAMPLE, POSITION, DRAW)


def trace_schema(loss_dtype: str = "float32", *, tokens: bool = False) -> pa.Schema:
    """Arrow schema of a trace block file (``tokens``: with the ``position`` column of token runs)."""
    return pa.schema(
        [
            pa.field(CHAIN, pa.int32(), nullable=False),
            pa.field(DRAW, pa.int32(), nullable=False),
            pa.field(SPLIT, pa.dictionary(pa.int8(), pa.string()), nullable=False),
            pa.field(SAMPLE, pa.int64(), nullable=False),
        ] + ([pa.field(POSITION, pa.int64(), nullable=False)] if tokens else []) + [
            pa.field(LOSS, pa.float32() if loss_dtype == "float32" else pa.float64(), nullable=False),
        ]
    )


# key-value metadata stored in each trace file's schema
META_LAYOUT = b"bif.layout"

# --- health files -------------------------------------------------------------------
STEP = "step"
DISTANCE = "distance"  # ||w - w*||_2 at the draw
TRAIN_LOSS_MEAN = "train_loss_mean"
QUERY_LOSS_MEAN = "query_loss_mean"
REF_TRAIN_LOSS_MEAN = "ref_train_loss_mean"  # mean train loss at w*
HEALTH_COLUMNS = (CHAIN, DRAW, STEP, DISTANCE, TRAIN_LOSS_MEAN, QUERY_LOSS_MEAN, REF_TRAIN_LOSS_MEAN)

# --- reference file (losses at w*) -------------------------------------------------
REFERENCE_COLUMNS = (SPLIT, SAMPLE, LOSS)

# --- outputs -------------------------------------------------------------------------
BIF = "bif"  # -Cov(l_i, phi_j) over draws
BIF_CORR = "bif_corr"  # -Corr(l_i, phi_j) over draws
QUERY_DIM = "query"
TRAIN_DIM = "train"
TRAIN_CONSTANT = "train_constant"  # bool over dim train: the sample's loss trace is constant (zero variance)
QUERY_CONSTANT = "query_constant"  # bool over dim query


def constant_var(dim: str) -> str:
    """The bif.zarr variable flagging constant loss traces along ``dim`` (train or query)."""
    return {TRAIN_DIM: TRAIN_CONSTANT, QUERY_DIM: QUERY_CONSTANT}[dim]


# topk.parquet columns
RANK = "rank"
DIRECTION = "direction"  # "positive" (raises the query loss) or "negative"
TOPK_COLUMNS = (QUERY, DIRECTION, RANK, TRAIN, BIF, BIF_CORR)

# report.html: the section of the R-hat / ESS histograms. It reads only the diagnostics' output, so a flow
# draws it as soon as they finish (named here so that the flow need not import bif.report and pandas).
REPORT_DIAGNOSTICS_SECTION = "MCMC diagnostics"

# --- token runs (problem.loss returns (B, T) or ((B, T), mask)) --------------------------
# tokens.parquet: one row per valid token, in variable order (split, sample, position)
TOKEN = "token"  # problem.render_tokens(split, sample)[position], "" when the problem renders no tokens
REF_LOSS = "ref_loss"  # the token's loss at w*
TOKENS_COLUMNS = (SPLIT, SAMPLE, POSITION, TOKEN, REF_LOSS)

# topk_tokens.parquet: per valid query token, the top-k train tokens by bif in each sign
QUERY_SAMPLE = "query_sample"
QUERY_POSITION = "query_position"
TRAIN_SAMPLE = "train_sample"
TRAIN_POSITION = "train_position"
SIGN = "sign"  # "positive" | "negative", as topk.parquet's direction
QUERY_TOKEN = "query_token"  # text of the query token ("" without render_tokens)
TRAIN_TOKEN = "train_token"  # text of the train token
TRAIN_CONTEXT = "train_context"  # a few train tokens around it, the token itself marked ⟦ ⟧
TOPK_TOKENS_COLUMNS = (QUERY_SAMPLE, QUERY_POSITION, SIGN, RANK, TRAIN_SAMPLE, TRAIN_POSITION, BIF, BIF_CORR,
                       QUERY_TOKEN, TRAIN_TOKEN, TRAIN_CONTEXT)
CONTEXT_MARK = ("⟦", "⟧")

# bif_tokens.zarr: dims and the mixed-level variables
TRAIN_TOKEN_DIM = "train_token"
QUERY_TOKEN_DIM = "query_token"
BIF_SEQ_TOK = "bif_seq_tok"  # (train, query_token): -Cov(train sequence loss, query token loss)
BIF_TOK_SEQ = "bif_tok_seq"  # (train_token, query): -Cov(train token loss, query sequence loss)

# diagnostics.parquet columns (besides split, sample)
RHAT = "rhat"  # rank-normalized split R-hat (ArviZ)
ESS_BULK = "ess_bulk"
ESS_TAIL = "ess_tail"
CONSTANT = "constant"  # the loss trace is constant over all draws: rhat / ess are NaN (undefined) there
DIAGNOSTICS_COLUMNS = (SPLIT, SAMPLE, RHAT, ESS_BULK, ESS_TAIL, CONSTANT)

# --- file names ----------------------------------------------------------------------
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
REFERENCE_FILE = "reference.parquet"
TRACES_DIR = "traces"
HEALTH_DIR = "health"
STATE_DIR = "state"
BIF_ZARR = "bif.zarr"
TOPK_FILE = "topk.parquet"
QUALITY_DIR = "quality"
QUALITY_SUMMARY_FILE = "summary.json"  # inside QUALITY_DIR
DIAGNOSTICS_FILE = "diagnostics.parquet"
REPORT_FILE = "report.html"
TOKENS_FILE = "tokens.parquet"
TOPK_TOKENS_FILE = "topk_tokens.parquet"
BIF_TOKENS_ZARR = "bif_tokens.zarr"

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
STATUS_FAILED_QUALITY = "failed_quality"


def block_name(chain: int, block: int, suffix: str) -> str:
    """Relative file name of one chain block, e.g. ``chain-0/block-00003.parquet``.

    Not Hive-style (``chain=0``) on purpose: the files carry a ``chain`` column, and
    ``pandas.read_parquet("<output>/traces")`` must read the folder as one table.
    """
    return f"chain-{chain}/block-{block:05d}.{suffix}"


# --- operations: many runs under one output (bif watch / bif backfill; bif/store/catalog.py) ---------
#   runs/<run_id>/                  one run directory per (checkpoint content, config) pair
#   catalog/<run_id>-<ns>-<u>.parquet   one row: a run's state as recorded at one moment (never rewritten)
#   catalog.parquet                 compacted: one row per run, its latest recorded state
RUNS_DIR = "runs"
CATALOG_DIR = "catalog"
CATALOG_FILE = "catalog.parquet"

RUN_ID = "run_id"
CHECKPOINT_URI = "checkpoint_uri"
CHECKPOINT_SHA256 = "checkpoint_sha256"
CHECKPOINT_MTIME = "checkpoint_mtime"
CONFIG_HASH = "config_hash"
STATUS = "status"
OUTPUT_URI = "output_uri"
STARTED_AT = "started_at"
FINISHED_AT = "finished_at"
RECORDED_AT = "recorded_at"
ERROR = "error"
#: catalog timing columns (seconds), copied from the run manifest's ``timings`` (wall_s: measured by the sweep)
CATALOG_TIMINGS = ("wall_s", "total_s", "prepare_s", "sampling_s", "covariance_s", "gates_s", "diagnostics_s")
#: catalog quality columns: the gate verdict and the diagnostics' headline numbers
QUALITY_PASSED = "quality_passed"
FAILED_GATES = "failed_gates"
NUM_WARNINGS = "num_warnings"
RHAT_MAX = "rhat_max"
NUM_RHAT_ABOVE = "num_rhat_above_threshold"
ESS_BULK_MIN = "ess_bulk_min"
N_TRAIN = "n_train"
N_QUERY = "n_query"
NUM_CHAINS = "num_chains"
NUM_DRAWS = "num_draws"
RESUMED_BLOCKS = "resumed_blocks"


def catalog_schema() -> pa.Schema:
    """Arrow schema of catalog rows (``catalog/*.parquet`` and ``catalog.parquet``)."""
    ts = pa.timestamp("us", tz="UTC")
    fields = [(RUN_ID, pa.string()), (CHECKPOINT_URI, pa.string()), (CHECKPOINT_SHA256, pa.string()),
              (CHECKPOINT_MTIME, ts), (CONFIG_HASH, pa.string()), (STATUS, pa.string()), (OUTPUT_URI, pa.string()),
              (STARTED_AT, ts), (FINISHED_AT, ts), (RECORDED_AT, ts)]
    fields += [(name, pa.float64()) for name in CATALOG_TIMINGS]
    fields += [(QUALITY_PASSED, pa.bool_()), (FAILED_GATES, pa.string()), (NUM_WARNINGS, pa.int64()),
               (RHAT_MAX, pa.float64()), (NUM_RHAT_ABOVE, pa.int64()), (ESS_BULK_MIN, pa.float64()),
               (N_TRAIN, pa.int64()), (N_QUERY, pa.int64()), (NUM_CHAINS, pa.int64()), (NUM_DRAWS, pa.int64()),
               (RESUMED_BLOCKS, pa.int64()), (ERROR, pa.string())]
    return pa.schema([pa.field(n, t) for n, t in fields])
