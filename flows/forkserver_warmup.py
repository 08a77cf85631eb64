"""Imported by a kept cluster's forkserver (:data:`bif.flows.runtime.KEPT_PRELOAD`): draws the report's warm-up figure.

Importing matplotlib is not enough: a worker's first figure still set up its text layout and drawing and loaded
Pillow's image plugins (matplotlib reopens its font files in a forked child itself). In a worker forked from a
forkserver that had only imported matplotlib, :func:`bif.report.warm` took 0.76-0.91 s (0.03-0.05 s the second
time), and every `bif run` on a kept cluster paid it in the worker that draws the report's sections, beside the
gates and the diagnostics. The forkserver draws it once here, and every worker it
forks starts with all of that loaded.

Drawing starts no thread, so forking afterwards stays safe. A failure only costs the warm-up: the forkserver skips
a preload module that raises ImportError, and would die of any other error, so every error is swallowed here (the
report's own call meets and reports it).
"""
from __future__ import annotations

import contextlib

with contextlib.suppress(Exception):
    from bif import report

    report.warm()
