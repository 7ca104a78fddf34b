"""Errors a user can act on.

Every error raised because of bad input (a file, a name, a number the user gave) is a
``DG2PFError``: its message says what is wrong and, where possible, what to do instead.
Front ends (CLI, HTTP service) turn these into exit code 2 / 4xx responses; anything else
is a bug and surfaces as a traceback.
"""

from __future__ import annotations


class DG2PFError(Exception):
    """Base class: bad input or an unusable environment, described for the user."""

    #: the input field the error is about ("sparsity", "checkpoint", ...) when known
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(DG2PFError):
    """An option value is outside its valid range or inconsistent with another."""

    field = "config"


class UnknownArchitectureError(DG2PFError):
    field = "arch"


class CheckpointError(DG2PFError):
    """A checkpoint file cannot be read safely or does not fit the architecture."""

    field = "checkpoint"


class DatasetError(DG2PFError):
    """A dataset spec names no usable data, or its classes do not fit the model."""

    field = "dataset"


class ResumeError(DG2PFError):
    """A training checkpoint does not belong to this run."""

    field = "resume"


class InputError(DG2PFError):
    """Data sent to a served model (a tensor, an image) does not fit it."""

    field = "inputs"


class InputModelMismatch(DG2PFError):
    """The input model scores near chance on the job's data (``chance_baseline: refuse``)."""

    field = "checkpoint"


class TrainingDiverged(DG2PFError):
    """The training loss became NaN or infinite: the options (learning rate) do not suit the model."""

    field = "lr"


class OutputError(DG2PFError):
    """The results could not be written (disk full, permissions) after training finished."""

    field = "out"
