"""Flows (installed as ``bif.flows``): the top of the stack, where Prefect and Dask are wired in.

Owns the Prefect flows (``attribution``, ``lds``, ``calibrate``), the shared runtime
(``runtime``: Dask cluster, GPU resources, thread caps, credentials, logging), progress
display, the local Prefect server helper, and the ``bif`` command line (``cli``,
``cli_lds``, ``cli_report``). Nothing under ``bif/`` or ``tasks/`` imports this package.
"""
