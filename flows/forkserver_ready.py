"""The last module a forkserver imports (:func:`bif.flows.runtime._use_forkserver`): moves everything its preloads
created out of reach of the garbage collector (``gc.freeze``), for every worker it forks.

A forked worker inherits the forkserver's millions of objects (torch, Prefect, distributed, pandas, ...). Its first
full collection walked them all and wrote to their pages (their GC headers), which copied those pages from the
forkserver: 0.4 s of a core in the middle of whatever the worker ran first (seen in a profile of the report's first
sections, inside the class body that happened to trigger it). Frozen, they are never traversed; the worker's own
objects are collected as before. The collection first drops the preloads' garbage, so nothing dead is frozen.
This is the pattern the ``gc.freeze`` documentation gives for a process that forks workers.
"""
from __future__ import annotations

import gc

gc.collect()
gc.freeze()
