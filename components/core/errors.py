"""Project exceptions: errors a user can cause, with a message that says what to do.

The CLI maps each class to an exit code, so scripts can tell them apart.
"""

from __future__ import annotations


class ImgflowError(Exception):
    """Base of every error a user can cause (bad path, bad image, bad param)."""

    exit_code = 2


class ConfigError(ImgflowError):
    """Invalid ``params.yaml`` or ``--set`` override."""


class DataError(ImgflowError):
    """A data source cannot be read (missing folder, bad CSV, no usable image)."""


class DataUnavailableError(DataError):
    """Built-in data is not installed and cannot be downloaded (offline)."""


class ValidationFailedError(ImgflowError):
    """The data-validation suite failed; the report says which expectation and which rows."""

    exit_code = 4


class GatesFailedError(ImgflowError):
    """The model did not pass its evaluation gates (not a crash: exit code 3)."""

    exit_code = 3


class TrackingError(ImgflowError):
    """The MLflow tracking server or registry cannot be reached or refused a call."""
