"""Warnings raised by bif-pipeline (tests turn them into errors)."""


class BifWarning(UserWarning):
    """Something looks wrong but the run can go on."""
