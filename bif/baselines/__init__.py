"""Classical attribution baselines in the BIF's (train, query) layout and sign.

Every method returns an ``xarray.DataArray`` with dims ``("train", "query")``, coordinates
equal to the sample ids (dataset indices), float64 values, and the sign convention of
:mod:`bif.lds`: τ[i, q] > 0 means including train example i raises query q's loss.

- :func:`bif.baselines.influence.influence_scores`: damped classical influence function
  (explicit Hessian, CG or LiSSA).
- :func:`bif.baselines.graddot.graddot_scores`, :func:`~bif.baselines.graddot.gradcos_scores`:
  TracIn at the final checkpoint.
- :func:`bif.baselines.ekfac.ekfac_scores` (kronfluence) and :func:`bif.baselines.trak.trak_scores`
  (traker): optional extras, ``pip install .[baselines]``.
"""
from bif.baselines.common import as_scores, bif_scores

__all__ = ["as_scores", "bif_scores"]
