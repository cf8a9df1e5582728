"""Errors the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


class KopeError(Exception):
    """An error the user can act on; the CLI prints it on one line."""

    exit_code = 1


class ConfigError(KopeError):
    """A config file, include or override is invalid; raised before any stage runs."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = file, key, message
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class StaleStageError(KopeError):
    """A finished stage's config or inputs changed; re-running it needs ``--force``."""

    exit_code = 3


class LockedError(KopeError):
    """Another ``kope run`` holds the run directory."""

    exit_code = 4


class StageFailed(KopeError):
    """At least one stage failed; its state file holds the error and traceback path."""

    exit_code = 1


INTERRUPTED_EXIT_CODE = 75
"""``EX_TEMPFAIL``: a stop signal ended the work after it saved what it had; run the same command again."""


class Interrupted(KopeError):
    """A stop signal ended a stage (a training stage saved a checkpoint first) or ``kope run`` itself; running the
    same command again continues where it stopped."""

    exit_code = INTERRUPTED_EXIT_CODE
