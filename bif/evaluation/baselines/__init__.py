"""Classical attribution baselines in the BIF's (train, query) layout and sign.

Every method returns an ``xarray.DataArray`` with dims ``("train", "query")``, coordinates
equal to the sample ids (dataset indices), float64 values, and the sign convention of
:mod:`bif.evaluation.lds`: τ[i, q] > 0 means including train example i raises query q's loss.

- :func:`bif.evaluation.baselines.influence.influence_scores`: damped classical influence function
  (explicit Hessian, CG or LiSSA).
- :func:`bif.evaluation.baselines.graddot.graddot_scores`, :func:`~bif.evaluation.baselines.graddot.gradcos_scores`:
  TracIn at the final checkpoint.
- :func:`bif.evaluation.baselines.ekfac.ekfac_scores` (kronfluence) and :func:`bif.evaluation.baselines.trak.trak_scores`
  (traker): optional extras, ``pip install .[baselines]``.

Each is registered by name in :mod:`bif.evaluation.methods`, through which
:func:`bif.evaluation.scoring.score_method` and ``bif lds --methods`` reach it.
"""
from bif.evaluation.baselines.common import as_scores, bif_scores

__all__ = ["as_scores", "bif_scores"]
