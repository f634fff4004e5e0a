"""Errors that the CLI turns into exit codes."""


class BadInput(Exception):
    """Input the user can fix: printed as one line, exit code 2, nothing written."""


class RuntimeFailure(Exception):
    """Something went wrong while doing valid work: exit code 1."""
