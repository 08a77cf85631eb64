"""Compute units of the pipeline.

``sampler`` (torch) and ``moments`` (numpy) are pure math and import no Prefect, Dask or
fsspec. ``traces`` and ``covariance`` add storage and Dask. ``steps`` holds the thin
Prefect ``@task`` wrappers; nothing else in this package imports Prefect.
"""
