"""Sampling: the localized SGLD / pSGLD chains that record per-sample loss traces (torch only).

Owns the update equations, the recording of draws into blocks, finite checks and the
chain's resume state (``chain``). Pure math: imports no Prefect, Dask or fsspec
(tests/test_architecture.py checks this); storing the blocks is :mod:`bif.store`'s job.
"""
