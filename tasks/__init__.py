"""Tasks (installed as ``bif.tasks``): the compute steps of a run, between the library and the flows.

Owns the steps of the attribution pipeline (``pipeline``: prepare, sample a chain, check,
finish), the Dask map-reduce of the covariance (``covariance``), and the thin Prefect
``@task`` wrappers (``steps``; nothing else here imports Prefect). Never imports
:mod:`bif.flows`.
"""
