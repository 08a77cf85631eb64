"""The sampler: localized SGMCMC chains (:mod:`~bif.sampling.chain`), their kernels
(:mod:`~bif.sampling.kernels`) and the layout of the recorded variables (:mod:`~bif.sampling.measure`).

Pure torch / numpy: nothing here imports Prefect, Dask or fsspec.
"""
