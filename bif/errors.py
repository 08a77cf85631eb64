"""Domain exceptions. Every message names the bad value and the fix."""
from __future__ import annotations


class BifError(Exception):
    """Base class of all errors raised on purpose by bif-pipeline."""

    exit_code = 2


class ConfigError(BifError):
    """The run configuration is invalid (unknown key, bad value, bad override)."""


class ProblemError(BifError):
    """The user's problem factory, model, datasets or loss do not meet the interface."""


class CheckpointError(BifError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class StorageError(BifError):
    """An output or input URI cannot be reached, read or written."""


class ChainDivergedError(BifError):
    """A chain produced a NaN or Inf loss."""

    def __init__(self, *, chain: int, draw: int, split: str, sample: int, value: float):
        self.chain, self.draw, self.split, self.sample, self.value = chain, draw, split, sample, value
        super().__init__(
            f"chain {chain} diverged: {split} sample {sample} has loss {value} at draw {draw}. "
            "Lower sampler.step_size, raise sampler.gamma, or lower sampler.nbeta "
            "(`bif calibrate` searches these)."
        )

    def __reduce__(self):  # keep the fields when the error crosses a process boundary (Dask)
        return (_rebuild_diverged, (self.chain, self.draw, self.split, self.sample, self.value))


def _rebuild_diverged(chain: int, draw: int, split: str, sample: int, value: float) -> ChainDivergedError:
    return ChainDivergedError(chain=chain, draw=draw, split=split, sample=sample, value=value)


class RunConflictError(BifError):
    """The output location already holds a run made with a different configuration."""


class IncompleteRunError(BifError):
    """A run's outputs are read but its manifest is not marked complete."""


class QualityError(BifError):
    """A data-quality gate failed."""
