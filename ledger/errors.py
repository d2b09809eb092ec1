"""Errors that reach the user as one line and an exit code.

Exit codes follow the CLI convention of the project: 2 for bad usage or bad input (the user
can fix the command or the file), 1 for a problem with stored state (the database, a blob,
the model on disk).
"""
from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the CLI turns into `error: <message>` and an exit code."""

    exit_code = 1


class InputError(LedgerError):
    """A malformed fact file, option or revision name: nothing was written."""

    exit_code = 2


class NotFoundError(InputError):
    """A revision, ref or edit that does not exist."""


class StateError(LedgerError):
    """The stored state refuses the operation (schema too old, tampered blob, other base)."""

    exit_code = 1


class BranchMoved(StateError):
    """Another writer committed on the branch while this edit was training."""


class SchemaError(StateError):
    """The database schema is not at the head migration."""


class IntegrityError(StateError):
    """A stored hash does not match its content."""
