"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class FedMnistError(Exception):
    """Base class for errors caused by the user's input (files, arguments, configuration)."""


class DataError(FedMnistError):
    """A dataset or partition file is missing, malformed or inconsistent."""


class UpdateFileError(FedMnistError):
    """A weights file (client update or global weights) cannot be read safely or is malformed."""


class ValidationError(FedMnistError):
    """A set of client updates cannot be aggregated together."""


class ConfigError(FedMnistError):
    """Invalid arguments or configuration values."""


class WriteError(FedMnistError):
    """An output could not be written (a full disk, a read-only destination); nothing partial is left."""

class WorkerError(FedMnistError):
    """The worker pool cannot go on: a worker could not start, the pool is closed, or an evaluation failed."""
