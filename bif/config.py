"""Run configuration: frozen, validated pydantic models with a description on every field.

``load_config(path, overrides=["sampler.num_draws=400"], output="s3://b/run")`` is the one
entry point. Unknown keys are errors (``extra="forbid"``). ``config_hash`` hashes the
resolved config without credentials; outputs are keyed by it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bif.errors import ConfigError
from bif.quality.registry import default_severity, gate_names

_FROZEN = ConfigDict(extra="forbid", frozen=True)
#: Default of quality.rhat_threshold (also the report's fallback for runs without a config.json).
RHAT_THRESHOLD = 1.1


class SamplerConfig(BaseModel):
    """Localized SGLD settings; see ``bif.sampling.chain`` for the update equation."""

    model_config = _FROZEN

    num_chains: int = Field(4, ge=1, description="Independent chains, each started at w*.")
    num_draws: int = Field(200, ge=2, description="Recorded draws per chain.")
    num_burnin_steps: int = Field(100, ge=0, description="SGLD steps before the first draw.")
    steps_per_draw: int = Field(5, ge=1, description="SGLD steps between recorded draws (thinning).")
    step_size: float = Field(1e-4, gt=0, description="Step size epsilon of the SGLD update.")
    nbeta: float | None = Field(
        None,
        gt=0,
        description="n*beta, multiplies the mean minibatch loss. None: n_train (beta = 1); for token losses "
        "((B, T) or ((B, T), mask)) the number of valid train tokens, since the minibatch loss is then the mean "
        "over the batch's valid tokens and L_n the mean over all valid train tokens (the LM convention).",
    )
    gamma: float = Field(1000.0, ge=0, description="Localization strength gamma of the prior around w*.")
    batch_size: int = Field(64, ge=1, description="Minibatch size of the SGLD gradient.")
    seed: int = Field(0, ge=0, description="Root seed; chain seeds derive from it.")
    preconditioner: Literal["none", "rmsprop"] = Field("none", description="Optional RMSProp preconditioning (pSGLD).")
    rmsprop_alpha: float = Field(0.99, gt=0, lt=1, description="RMSProp decay of the squared-gradient average.")
    rmsprop_eps: float = Field(1e-5, gt=0, description="RMSProp epsilon added to the root mean square.")
    draws_per_block: int = Field(50, ge=1, description="Draws per committed trace block (resume granularity).")
    eval_batch_size: int = Field(2048, ge=1, description="Batch size of the no-grad per-sample loss evaluation.")
    trace_dtype: Literal["float32", "float64"] = Field("float32", description="Stored dtype of per-sample losses.")
    params: list[str] | None = Field(
        None, description="Name globs (fnmatch over model.named_parameters(), e.g. ['transformer.h.3.*', "
        "'lm_head.*']) of the parameters to sample; the others stay at w*, and the saved chain state holds only "
        "the sampled ones. None: every parameter with requires_grad.")
    autocast: Literal["bf16"] | None = Field(
        None, description="'bf16': evaluate the losses (SGLD gradients and recorded draws) under torch.autocast "
        "bfloat16 on CUDA; ignored with a warning on CPU. Losses are stored in trace_dtype.")

    @field_validator("params")
    @classmethod
    def _params_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not isinstance(g, str) or not g for g in value)):
            raise ValueError("sampler.params must be a non-empty list of name globs, e.g. ['lm_head.*'], or null")
        return value


class CovarianceConfig(BaseModel):
    """Dask map-reduce settings of the covariance stage."""

    model_config = _FROZEN

    train_block_size: int = Field(8192, ge=1, description=(
        "Train samples per output block, at most (a task's memory ~ 4 bytes x block x (query block x 3 + draws); "
        "bif.zarr's chunks). On a cluster the blocks may be a little smaller, so that their number is a multiple "
        "of the workers."))
    query_block_size: int = Field(1024, ge=1, description="Query samples per output block.")
    split_every: int = Field(8, ge=2, description="Fan-in of the Dask reduction tree.")
    pooling: Literal["stack", "chain_mean"] = Field(
        "stack", description="'stack' pools all chains' draws; 'chain_mean' averages per-chain covariances."
    )
    ddof: int = Field(1, ge=0, le=1, description="Delta degrees of freedom of the covariance.")
    topk: int = Field(20, ge=1, description="Most positive and most negative train examples kept per query.")
    compress: bool = Field(False, description="zstd-compress bif.zarr (saves ~8% on noisy floats, ~4x slower writes).")
    token_matrix: bool = Field(
        False, description="Token runs: also write bif_tokens.zarr, the (train_token, query_token) BIF of every "
        "valid token pair plus the mixed bif_seq_tok / bif_tok_seq (an out-of-core Dask reduction; its size is "
        "train tokens x query tokens).")
    token_train_block_size: int | None = Field(
        None, ge=1, description="Token runs: train tokens per token-level output block (a task's memory is about "
        "3 x block x draws x 8 bytes, draws <= 1024 stacked per leaf). None: train_block_size. Query tokens per "
        "block: query_block_size.")
    token_topk: int | None = Field(
        None, ge=1, description="Token runs: train tokens kept per query token and sign in topk_tokens.parquet "
        "(always written). None: topk.")


class ComputeConfig(BaseModel):
    """Where the work runs."""

    model_config = _FROZEN

    address: str | None = Field(None, description="Join an existing Dask scheduler (tcp://host:8786). None: start a LocalCluster.")
    n_workers: int | None = Field(None, ge=1, description="LocalCluster worker processes. None: min(num_chains, cores).")
    threads_per_worker: int = Field(1, ge=1, description="Threads (and torch threads) per worker.")
    gpus: int = Field(0, ge=0, description="GPUs per LocalCluster; chain tasks then claim resources={'GPU': 1}.")
    device: str = Field("auto", description="Torch device for chains: 'auto' (CUDA when available), 'cpu', 'cuda'.")
    keep_cluster: bool = Field(
        True, description="CLI commands keep their LocalCluster between commands (bif.flows.kept_cluster): the next "
        "command with the same set-up reuses it, with fresh workers; it stops after keep_cluster_idle_s or with "
        "`bif server stop`. Env BIF_KEEP_CLUSTER=0 turns it off too. Ignored with 'address'.")
    keep_cluster_idle_s: float = Field(
        600.0, gt=0, description="Seconds the kept cluster waits for the next command before it stops; each command "
        "sets it for the wait after itself. Set it above the interval of a scheduled command (cron every 15 minutes: "
        "1200), whose every run otherwise starts a new cluster. Not part of the set-up: changing it never replaces "
        "the cluster.")


class QualityConfig(BaseModel):
    """Data-quality gates and MCMC diagnostics (see ``bif.quality.run`` / ``bif.quality.diagnostics``)."""

    model_config = _FROZEN

    enabled: bool = Field(True, description="Run the data-quality gates on the finished run.")
    diagnostics: bool = Field(
        True, description="Compute the MCMC diagnostics (ArviZ R-hat / ESS, BIF MCSE; diagnostics.parquet) of the "
        "finished run. Independent of 'enabled', which switches the gates only."
    )
    allow_warnings: bool = Field(
        False, description="Report every failed gate as a warning instead of failing the run (CLI --allow-warnings)."
    )
    severity: dict[str, Literal["error", "warning"]] = Field(
        default_factory=dict,
        description="Per-gate severity, e.g. {health_distance: warning}. A failed 'error' gate fails the run; "
        "a failed 'warning' gate is only reported. Gates not listed are 'error', except "
        + ", ".join(f"{g} ('{s}')" for g, s in default_severity().items())
        + ". Gates (bif.quality.registry): " + ", ".join(gate_names()) + ".",
    )
    @field_validator("severity")
    @classmethod
    def _known_gates(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = [k for k in value if k not in gate_names()]
        if unknown:
            raise ValueError(f"unknown quality gate {', '.join(map(repr, unknown))}; valid gates (bif.quality.registry): "
                             + ", ".join(gate_names()))
        return value

    max_loss_factor: float = Field(
        10.0, gt=1, description="A chain runs away when its mean train loss over draws exceeds "
        "max_loss_factor x (mean train loss at w*) + loss_slack."
    )
    loss_slack: float = Field(
        1.0, ge=0, description="Absolute slack (loss units) of the runaway bound, so that a checkpoint with "
        "near-zero loss does not flag the ordinary posterior spread of the loss."
    )
    max_distance: float | None = Field(
        None, gt=0, description="Bound on ||w - w*|| at every draw. None: max_distance_factor x the median "
        "distance over all chains and draws."
    )
    max_distance_factor: float = Field(
        10.0, gt=1, description="Relative distance bound used when max_distance is None."
    )
    corr_atol: float = Field(1e-6, ge=0, description="Tolerance of the bif_corr in [-1, 1] gate (float32 storage).")
    self_influence_rtol: float = Field(
        1e-6, ge=0, description="Self-influence gate (query set = train set): bif[i, i] <= rtol x max_i |bif[i, i]|."
    )
    max_constant_share: float = Field(
        0.5, ge=0, le=1, description="Gate traces_constant (severity 'warning' unless set) flags a split whose "
        "share of constant loss traces (zero variance over all draws; bif and bif_corr 0) exceeds this."
    )
    rhat_threshold: float = Field(RHAT_THRESHOLD, gt=1, description="Samples whose rank R-hat exceeds this are counted as unmixed.")
    mcse_num_batches: int = Field(
        10, ge=2, description="Batches of contiguous draws per chain for the batch-means MCSE of the BIF."
    )
    diagnostics_block_samples: int | None = Field(
        None, ge=1, description="Samples read per block by the diagnostics stage (memory ~ chains x draws x block). "
        "None: as many as hold 2**20 loss values (chains x draws x block; 8 MiB in float64), 512 to 8,192."
    )
    diagnostics_max_samples: int | None = Field(
        None, ge=1, description="Diagnose only the first N samples of each split (None: all)."
    )


class RunConfig(BaseModel):
    """One attribution run: problem, checkpoint, output, and the stage settings."""

    model_config = _FROZEN

    problem: str = Field(..., description="Factory import path 'module:function' returning the problem.")
    problem_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the factory.")
    checkpoint: str | None = Field(None, description="Optional state-dict URI loaded into the model (weights_only).")
    output: str = Field("runs/latest", description="Output directory or URI (local path, s3://, memory://).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options (credentials). Never written to outputs or logs."
    )
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="SGLD settings.")
    covariance: CovarianceConfig = Field(default_factory=CovarianceConfig, description="Reduction settings.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Cluster settings.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Quality gates and diagnostics.")

    @model_validator(mode="after")
    def _check_problem(self) -> "RunConfig":
        if ":" not in self.problem:
            raise ValueError(f"problem must be 'module:function', got {self.problem!r}")
        return self

    def public_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-able data, with storage_options redacted."""
        data = self.model_dump(mode="json")
        data["storage_options"] = {k: "***" for k in self.storage_options}
        return data

    def hash(self) -> str:
        """Short sha256 of the settings that determine the traces: problem and sampler.

        The checkpoint enters by content, not by path: the run's identity (``checkpoint_sha256``,
        see :mod:`bif.tasks.pipeline`) is checked on every start and resume, so a checkpoint that
        was moved or copied elsewhere resumes its half-finished run, and a replaced one is refused.
        """
        data = self.model_dump(mode="json", include={"problem", "problem_args", "sampler"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for key in keys[:-1]:
        nxt = cur.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a copy of ``data``."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. sampler.num_draws=400")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            why = str(err).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value {raw!r} is not valid YAML ({why}); quote it or fix the "
                "brackets, e.g. --set 'sampler.num_draws=400' or --set 'problem_args.sizes=[1, 2]'"
            ) from None
        _set_path(out, key.strip(), value)
    return out


def _format_validation(err: ValidationError, storage_options: Any = None) -> str:
    """One line per pydantic error. Inputs are echoed, except where they could hold credentials:
    values under ``storage_options`` and whole-config inputs are never shown, and any secret
    left in the text is redacted."""
    from bif.store.fs import redact

    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {loc!r}: remove it or fix the spelling (`bif keys` lists every key)")
        elif not e["loc"] or e["loc"][0] == "storage_options" or isinstance(e.get("input"), dict):
            lines.append(f"{loc or 'config'}: {e['msg']}" + (
                " (storage_options must be a mapping of fsspec options, e.g. {key: ..., secret: ...,"
                " client_kwargs: {endpoint_url: ...}}; its values are not shown)" if loc.startswith("storage_options")
                else ""))
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return redact("invalid config:\n  " + "\n  ".join(lines), storage_options)


def build_config(data: dict[str, Any]) -> RunConfig:
    """Validate a mapping into a RunConfig, turning pydantic errors into ConfigError."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, data.get("storage_options") if isinstance(data, dict) else None)
                          ) from None


def load_config(
    path: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    output: str | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Read a YAML config, apply ``--set`` overrides and ``--output``, and validate it."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {' '.join(str(err).split())[:300]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level")
        data.update(loaded)
    data = apply_overrides(data, overrides)
    if output is not None:
        data["output"] = output
    return build_config(data)


def config_reference() -> str:
    """Every config key with its default and description, as YAML-like text for --help."""
    lines = []

    def walk(model: type[BaseModel], indent: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append(f"{indent}{name}:  # {field.description}")
                walk(ann, indent + "  ")
            else:
                default = None if field.is_required() else field.get_default(call_default_factory=True)
                lines.append(f"{indent}{name}: {json.dumps(default)}  # {field.description}")

    walk(RunConfig, "")
    return "\n".join(lines)
