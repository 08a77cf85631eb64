"""bif-pipeline: training-data attribution with local Bayesian influence functions.

Layers (imports point one way; docs/architecture.md): pure math in ``bif.sampling`` /
``bif.moments`` (torch / numpy only) <- the run store (``bif.store``), quality
(``bif.quality``) and evaluation (``bif.evaluation``) <- the compute steps and Dask
reductions in ``bif.tasks`` <- the Prefect flows and the CLI in ``bif.flows``.
"""
__version__ = "0.1.0"
