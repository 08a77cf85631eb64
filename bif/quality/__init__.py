"""Quality: data-quality gates and MCMC diagnostics of a finished run.

Owns the gate registry (``registry``: names, default severities, descriptions; the keys of
``quality.severity``), shared health rules (``rules``: the runaway-chain rule), the Great
Expectations adapter (``expectations``), per-block and per-chunk aggregates
(``aggregates``), the gate suites (``gates``), running them over a run directory (``run``),
and ArviZ R-hat / ESS and the BIF's MCSE (``diagnostics``). No Prefect; GE is imported
lazily.
"""
