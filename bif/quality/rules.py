"""Sampler-health rules written once, shared by the quality gates and by calibration (numpy only).

:func:`runaway` is the runaway-chain rule: the ``health_loss`` gate
(:func:`bif.quality.gates.check_health`) applies it to the health table of a run, and
:mod:`bif.evaluation.calibration` to the in-memory chains of a calibration setting and of the
step-size pilot.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def runaway_bound(ref_mean: ArrayLike, *, max_loss_factor: float, loss_slack: float):
    """The largest mean train loss a chain may have: ``max_loss_factor x ref_mean + loss_slack``.

    ``ref_mean`` is the mean train loss at w* (scalar, array or pandas Series; returned in kind).
    """
    return max_loss_factor * ref_mean + loss_slack


def runaway(mean_train_loss: ArrayLike, ref_mean: ArrayLike, *, max_loss_factor: float, loss_slack: float
            ) -> np.ndarray:
    """Per chain: True where it ran away, i.e. its mean train loss over draws exceeds :func:`runaway_bound`.

    ``mean_train_loss`` (chains,) is each chain's mean over draws of the mean train loss;
    ``ref_mean`` the mean train loss at w* (scalar or (chains,)). A NaN mean is not flagged
    here (the gates and the finite checks catch it). ``loss_slack`` (loss units) keeps a
    checkpoint with near-zero loss from flagging the ordinary posterior spread of the loss.
    """
    bound = runaway_bound(np.asarray(ref_mean, dtype=np.float64), max_loss_factor=max_loss_factor,
                          loss_slack=loss_slack)
    return np.asarray(mean_train_loss) > bound
