"""Storage: the one package that touches files, Parquet and Zarr.

- :mod:`bif.store.run`: :class:`RunStore`, the owner of a run directory (paths, atomic writes,
  manifest, config, lease, committed trace blocks as :class:`BlockRef`, every Parquet and Zarr
  read and write of a run);
- :mod:`bif.store.traces`: the trace block encoding and its commit / checksum / resume protocol;
- :mod:`bif.store.tables`: Parquet tables outside a run directory (``write_table`` / ``read_table``);
- :mod:`bif.store.fs`: fsspec helpers (URIs, atomic writes, strict JSON, redaction);
- :mod:`bif.store.manifest`, :mod:`bif.store.lease`: the manifest file and the output's lease.
"""
from bif.store.run import BifArray, BlockRef, RunStore

__all__ = ["BifArray", "BlockRef", "RunStore"]
