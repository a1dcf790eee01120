"""Errors a user can fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""


class TrialFailed(Exception):
    """A trial stopped for a reason recorded in its folder (e.g. a non-finite loss); the sweep goes on."""
