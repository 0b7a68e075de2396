"""Errors that are the user's to fix: the stages print them as one line, without a traceback."""


class UserError(Exception):
    """Bad input: a params key, a data file, a column, a row. The message names it."""


class ParamsError(UserError):
    """A bad value in params.yaml. `key` is the dotted path, e.g. ``train.learning_rate``."""

    def __init__(self, key: str, message: str, source: str = "params.yaml"):
        self.key = key
        super().__init__(f"{source}: {key}: {message}")


class Terminated(BaseException):
    """SIGTERM, raised from the handler that ``tracking.run`` installs so that ``finally`` blocks and the
    MLflow run's bookkeeping still run; the stage runner turns it into exit code 143, like an unhandled
    SIGTERM, without a traceback."""
