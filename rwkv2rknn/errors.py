"""Errors a user can act on.

Every error the CLI reports is one of these: a one-line message that names the problem and,
where there is one, the fix. The CLI prints ``str(error)`` and exits with ``exit_code``.
"""


class Rwkv2RknnError(Exception):
    """A job that failed for a reason the user can fix. Exit code 1."""

    exit_code = 1

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.problem}: {self.fix}" if self.fix else self.problem


class BadInput(Rwkv2RknnError):
    """A file or folder given by the user is missing, unreadable or not what it should be."""


class UnsupportedModel(BadInput):
    """A model that is readable but is not (yet) a supported RWKV model."""


class MissingDependency(Rwkv2RknnError):
    """An optional package that this job needs is not installed."""


class ToolkitError(Rwkv2RknnError):
    """rknn-toolkit2 or rknn-toolkit-lite2 refused or crashed."""


class CompileRefused(Rwkv2RknnError):
    """The compiled model is not the model it was compiled from (translation validation): the
    artifact is not written."""


class ResourceError(Rwkv2RknnError):
    """Not enough memory or disk for the job (said before it starts, with what to do)."""


class NumericalError(Rwkv2RknnError):
    """NaN or inf appeared at run time."""


class UsageError(Rwkv2RknnError):
    """A flag or argument that makes no sense. Exit code 2."""

    exit_code = 2
