"""Errors that are the user's to fix: the stages print them as one line, without a traceback."""

import re


class UserError(Exception):
    """Bad input: a params key, a data file, a column, a row. The message names it."""


class ParamsError(UserError):
    """A bad value in params.yaml. `key` is the dotted path, e.g. ``train.learning_rate``."""

    def __init__(self, key: str, message: str, source: str = "params.yaml"):
        self.key = key
        super().__init__(f"{source}: {key}: {message}")


class ServiceError(UserError):
    """A service named in the settings (the study's database, the tracking server) that cannot be used:
    unreachable, silent, refusing the credentials, or missing the database or bucket."""


def unreachable(setting: str, where: str, err: BaseException) -> ServiceError:
    """One line: the setting, where it points (password hidden by the caller) and the root cause."""
    reason = " ".join(str(getattr(err, "orig", None) or err).split())
    found = re.search(
        r"\[Errno -?\d+\] [^'\")]+|(?:Read|Connect|connection) timed out|timeout expired", reason
    )
    if found:
        reason = found.group(0)
    return ServiceError(f"{setting}: cannot use {where}: {type(err).__name__}: {reason[:300]}")


class Terminated(BaseException):
    """SIGTERM, raised from the handler that ``tracking.run`` installs so that ``finally`` blocks and the
    MLflow run's bookkeeping still run; the stage runner turns it into exit code 143, like an unhandled
    SIGTERM, without a traceback."""
