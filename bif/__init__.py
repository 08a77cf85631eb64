"""bif-pipeline: training-data attribution with local Bayesian influence functions.

Layers (imports point one way): pure math in ``bif.sampling.chain`` / ``bif.moments``
(torch / numpy only) <- storage and Dask reductions in ``tasks`` <- Prefect tasks in
``bif.tasks.steps`` <- flows in ``flows`` <- the CLI in ``bif.flows.cli``.
"""
__version__ = "0.1.0"
