"""Evaluation: how good an attribution is, and how to pick the sampler settings.

Owns the LDS benchmark (``lds``: subsets and the score; ``retrain``: ground truth by
retraining; ``store``: its cache; ``settings``: its settings), the attribution methods it
scores (``methods``: the registry; ``scoring``: dispatch and cost; ``baselines``: classical
influence, TracIn, EK-FAC, TRAK) and sampler calibration (``calibrate``: the sweep's logic;
``calibration``: running one setting). No Prefect: the flows in :mod:`bif.flows` wrap these.
"""
