"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class GenlabError(Exception):
    """Base of errors whose message tells the user what is wrong and what to do."""


class ConfigError(GenlabError, ValueError):
    """A problem with params.yaml (names the key)."""


class DataError(GenlabError, ValueError):
    """Missing, corrupt or mis-shaped data."""


class TrainingInterrupted(GenlabError, RuntimeError):
    """The fit stopped before max_epochs (SIGTERM, Ctrl-C); checkpoints are kept for resume."""


class TrackingError(GenlabError, RuntimeError):
    """MLflow could not be reached or refused a call."""


class TrainingDiverged(GenlabError, RuntimeError):
    """The loss turned NaN/Inf or the family's own divergence check fired; the last good
    checkpoint is kept."""
