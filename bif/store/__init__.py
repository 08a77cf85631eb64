"""The run store: everything that touches a run directory (local path, s3://, memory://).

Owns paths and fsspec filesystems (``fs``), atomic writes, the manifest and its lease
(``manifest``, ``lease``), and the trace blocks with their committed-block listing
(``traces``). Other packages reach a run's files through here; layout names come from
:mod:`bif.schema`.
"""
