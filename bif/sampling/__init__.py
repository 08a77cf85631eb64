"""Sampling: localized SGMCMC chains that record per-sample loss traces (torch / numpy only).

Owns the chains (:mod:`~bif.sampling.chain`: recording draws into blocks, finite checks,
resume state), their kernels (:mod:`~bif.sampling.kernels`: the update equations, SGLD and
pSGLD, a registry for new ones) and the layout of the recorded variables
(:mod:`~bif.sampling.measure`: samples or tokens, every offset in one place). Imports no
Prefect, Dask or fsspec (tests/test_architecture.py checks this); storing the blocks is
:mod:`bif.store`'s job.
"""
